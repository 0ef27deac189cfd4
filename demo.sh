#!/usr/bin/env bash
# Set-up and main job: create .venv, build the embedded default archives into model_store/, start
# TorchServe with config.properties, explain a bundled real photo, and write the reply and a rendered
# PNG next to it in demo_output/. TorchServe is stopped again at the end (by its PID).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash setup.sh
./archive.sh all
out=demo_output
mkdir -p "$out/tmp"
bin=.venv/bin
models=(effnet selfie)
photo="$out/grace_hopper.jpg"
"$bin/python" -c 'import shutil, sys, matplotlib.cbook as c; shutil.copy(c.get_sample_data("grace_hopper.jpg", asfileobj=False), sys.argv[1])' "$photo"

# One TorchServe per TMPDIR; setsid gives it its own process group so that it can be stopped as a whole.
TMPDIR="$PWD/$out/tmp" PATH="$PWD/$bin:$PATH" setsid "$bin/torchserve" --start --foreground --ncs \
  --ts-config config.properties --model-store model_store --models \
  $(for m in "${models[@]}"; do printf '%s=%s.mar ' "$m" "$m"; done) >"$out/torchserve.log" 2>&1 &
server=$!
trap 'kill -TERM -- -$server 2>/dev/null; wait $server 2>/dev/null || true' EXIT

echo "waiting for the workers of: ${models[*]}"
for _ in $(seq 300); do
  kill -0 "$server" 2>/dev/null || { tail -40 "$out/torchserve.log"; exit 1; }
  if [ -f key_file.json ] && "$bin/python" - "${models[@]}" <<'PY'
import json, sys, requests
key = json.load(open("key_file.json"))["management"]["key"]
for model in sys.argv[1:]:
    try:
        workers = requests.get(f"http://127.0.0.1:8081/models/{model}", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()[0]["workers"]
    except Exception:
        sys.exit(1)
    if not workers or any(w["status"] != "READY" for w in workers):
        sys.exit(1)
PY
  then break; fi
  sleep 1
done

client="$bin/vision-attribution"
"$client" send http://127.0.0.1:8080/predictions/effnet "$photo" "$out/effnet_prediction.json"
"$bin/python" -c 'import json, sys; print("effnet top-5:", ", ".join("%s %.2f" % (t["name"], t["probability"]) for t in json.load(open(sys.argv[1]))["top5"]))' "$out/effnet_prediction.json"
"$client" send http://127.0.0.1:8080/explanations/effnet "$photo" "$out/effnet_explanation.gz"
"$client" render "$out/effnet_explanation.gz" "$photo" "$out/effnet_explanation.png"
"$client" send http://127.0.0.1:8080/predictions/selfie "$photo" "$out/selfie_mask.png" --accept image/png
"$client" send http://127.0.0.1:8080/explanations/selfie "$photo" "$out/selfie_explanation.gz" --field idg_hierarchy=40
"$client" render "$out/selfie_explanation.gz" "$photo" "$out/selfie_explanation.png"
echo "wrote to $out/: effnet_prediction.json, effnet_explanation.{gz,png}, selfie_mask.png, selfie_explanation.{gz,png}"
