#!/usr/bin/env python3
"""Prove the Dockerfile without a Docker engine: run its steps in a Debian bookworm root and serve from it.

    sudo python3 tools/rootfs_proof.py [--root DIR] [--target cpu] [--build-arg NAME=VALUE ...] [--keep]

1. debootstrap a bookworm root (the base image's Debian release) and install what the base image adds
   (python3.11 with venv; the python image builds its own 3.11 in /usr/local, Debian's is 3.11.2).
2. Interpret the Dockerfile for the target stage: ARG/ENV/WORKDIR/USER/COPY/RUN of every stage the target
   needs, in file order, in that one root (COPY honours .dockerignore; COPY --from copies inside the root,
   since all stages share it; RUN --mount=type=cache binds a cache directory kept under the root's parent).
3. In new PID, mount and network namespaces (no port is opened on this machine), start the image's
   ENTRYPOINT as the image's USER, and check: the HEALTHCHECK command fails before the workers are READY and
   passes after; every archive in the model store answers a prediction over HTTP with the token; the
   processes run as the non-root user; SIGTERM to the init stops TorchServe and its workers cleanly.
It needs root (debootstrap, chroot, unshare), network to Debian and PyPI, and ~10 GB of disk; the root is
deleted afterwards unless --keep. Prints each check and exits 1 if one fails.
"""
import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_PACKAGES = ["python3", "python3-venv", "python-is-python3", "ca-certificates"]  # what python:3.11-slim-bookworm has
HOST_CAS = Path("/usr/local/share/ca-certificates")
# This machine reaches PyPI through a TLS-intercepting egress proxy: its CAs (HOST_CAS) are added to the
# root's trust store and pip/Python are pointed at it, as a build behind such a proxy would need; these two
# variables are the only environment the Dockerfile does not set.
BUILD_TRUST = {"PIP_CERT": "/etc/ssl/certs/ca-certificates.crt", "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}


def log(message: str) -> None:
    print(f"[rootfs-proof {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, **kwargs)


# ---------------------------------------------------------------- the Dockerfile, as a list of stages
def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments and the parser directive dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "") for line in text.splitlines() if line.strip()]


def stages(steps: list[tuple[str, str]]) -> tuple[dict[str, str], list[dict]]:
    """Global ARGs (before the first FROM) and the stages: {"name", "parent", "steps"}."""
    global_args, result = {}, []
    for op, args in steps:
        if op == "FROM":
            parts = args.split()
            result.append({"name": parts[2] if len(parts) > 2 else str(len(result)), "parent": parts[0], "steps": []})
        elif not result:
            name, _, value = args.partition("=")
            global_args[name] = value.strip('"')
        else:
            result[-1]["steps"].append((op, args))
    return global_args, result


def needed_stages(target: str, all_stages: list[dict]) -> list[str]:
    by_name = {stage["name"]: stage for stage in all_stages}
    needed, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name in needed or name not in by_name:
            continue
        needed.add(name)
        todo.append(by_name[name]["parent"])
        todo += [m.group(1) for op, args in by_name[name]["steps"] if op == "COPY" for m in [re.search(r"--from=(\S+)", args)] if m]
    return [stage["name"] for stage in all_stages if stage["name"] in needed]


def expand(text: str, env: dict[str, str]) -> str:
    """${VAR} and $VAR from the build environment (for COPY/ENV/WORKDIR; RUN lines are left to the shell)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def parse_assignments(args: str, env: dict[str, str]) -> dict[str, str]:
    return {name: expand(value, env) for name, _, value in (item.partition("=") for item in shlex.split(args))}


def ignored(relative: str, patterns: list[str]) -> bool:
    """.dockerignore: the last matching pattern decides ('!' re-includes); a pattern matches a path or its parents."""
    verdict = False
    parts = relative.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if fnmatch.fnmatch(prefix, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(parts[depth - 1], pattern[3:])):
                verdict = not negate
                break
    return verdict


def copy_from_context(source: str, destination: Path, into_directory: bool, patterns: list[str]) -> None:
    """COPY SOURCE DESTINATION from the build context: a directory's contents, or a file (into DESTINATION
    when it names a directory), less what .dockerignore excludes."""
    origin = REPO / source
    if origin.is_file():
        files = {origin: destination / origin.name if into_directory else destination}
    else:
        files = {path: destination / path.relative_to(origin) for path in origin.rglob("*") if path.is_file()}
    for path, target in files.items():
        if ignored(path.relative_to(REPO).as_posix(), patterns):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


class RootBuild:
    """Runs Dockerfile steps in `root` (a chroot) and remembers the final stage's configuration."""

    def __init__(self, root: Path, cache: Path, build_args: dict[str, str]):
        self.root, self.cache, self.build_args = root, cache, build_args
        self.patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
        self.config = {"env": {}, "user": "root", "workdir": "/", "entrypoint": None, "healthcheck": None}

    def inside(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def uid(self, user: str) -> tuple[int, int]:
        for line in self.inside("/etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user or fields[2] == user:
                return int(fields[2]), int(fields[3])
        raise ValueError(f"user {user} not in the root's /etc/passwd")

    def run_step(self, command: str, env: dict[str, str], user: str, workdir: str) -> None:
        mounts = re.findall(r"--mount=type=cache,target=(\S+)", command)
        command = re.sub(r"--mount=\S+\s*", "", command).strip()
        bound = []
        try:
            for target in mounts:  # a cache mount: a directory beside the root, bound for this step only
                source = self.cache / target.strip("/").replace("/", "_")
                source.mkdir(parents=True, exist_ok=True)
                self.inside(target).mkdir(parents=True, exist_ok=True)
                run(["mount", "--bind", str(source), str(self.inside(target))])
                bound.append(self.inside(target))
            uid, gid = self.uid(user)
            shell = f"cd {shlex.quote(workdir)} && {command}"
            variables = {**env, **BUILD_TRUST}
            run(["chroot", f"--userspec={uid}:{gid}", str(self.root), "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in variables.items()], "/bin/sh", "-c", shell])
        finally:
            for path in reversed(bound):
                run(["umount", str(path)])

    def stage(self, stage: dict, inherited: dict, global_args: dict[str, str]) -> dict:
        env = dict(inherited["env"])
        args = dict(inherited.get("args", {}))
        user, workdir = inherited["user"], inherited["workdir"]
        config = dict(inherited)
        for op, text in stage["steps"]:
            if op == "ARG":
                name, has_default, default = text.partition("=")
                args[name] = self.build_args.get(name, expand(default.strip('"'), {**global_args, **env}) if has_default else global_args.get(name, ""))
            elif op == "ENV":
                env.update(parse_assignments(text, {**args, **env}))
            elif op == "WORKDIR":
                workdir = expand(text, {**args, **env})
                self.inside(workdir).mkdir(parents=True, exist_ok=True)
                if user != "root":
                    uid, gid = self.uid(user)
                    os.chown(self.inside(workdir), uid, gid)
            elif op == "USER":
                user = text.strip()
            elif op == "RUN":
                log(f"RUN {text[:150]}")
                self.run_step(text, {**args, **env}, user, workdir)
            elif op == "COPY":
                words = shlex.split(expand(text, {**args, **env}))
                source_stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
                paths = [w for w in words if not w.startswith("--")]
                *sources, destination = paths
                destination_path = self.inside(destination if destination.startswith("/") else f"{workdir}/{destination}")
                for source in sources:
                    log(f"COPY {'--from=' + source_stage + ' ' if source_stage else ''}{source} {destination}")
                    if source_stage:  # every stage lives in this one root
                        origin = self.inside(source)
                        if origin.resolve() != destination_path.resolve():
                            shutil.copytree(origin, destination_path, dirs_exist_ok=True, symlinks=True) if origin.is_dir() else shutil.copy2(origin, destination_path)
                    else:
                        into_directory = destination.endswith("/") or len(sources) > 1 or destination_path.is_dir()
                        copy_from_context(source, destination_path, into_directory, self.patterns)
            elif op == "HEALTHCHECK":
                config["healthcheck"] = re.search(r"CMD\s+(\[.*\])", text).group(1)
            elif op == "ENTRYPOINT":
                config["entrypoint"] = text
        config.update(env=env, args=args, user=user, workdir=workdir)
        return config


# ---------------------------------------------------------------- serving from the root
RUN_SCRIPT = r"""#!/bin/sh
# Runs inside the root, as PID 1 of a new PID namespace, in a network namespace of its own.
set -u
cd {workdir}
setpriv --reuid={uid} --regid={gid} --init-groups /usr/bin/env -i {env} {entrypoint} > /proof/serve.log 2>&1 &
init=$!
echo "init pid $init"
health() {{ setpriv --reuid={uid} --regid={gid} --init-groups /usr/bin/env -i {env} sh -c 'cd {workdir} && exec {healthcheck}' 2>>/proof/health.log; }}
early=""
ready=""
for second in $(seq 1 900); do
  if health; then ready=$second; break; fi
  [ -z "$early" ] && early="unready at ${{second}}s"
  sleep 1
done
echo "healthcheck: ${{early:-never unready}}; ready after ${{ready:-never}}s"
setpriv --reuid={uid} --regid={gid} --init-groups /usr/bin/env -i {env} python /proof/requests.py
echo "users of the server processes: $(python /proof/processes.py users)"
kill -TERM $init
start=$(date +%s)
wait $init
echo "init exit status $? after $(( $(date +%s) - start ))s"
sleep 1
echo "processes left: $(python /proof/processes.py count)"
"""

PROCESSES_SCRIPT = r"""
import os, pwd, sys
found = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        command = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        uid = int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("Uid:")).split()[1])
    except (OSError, StopIteration):
        continue
    if "java" in command or "model_service_worker" in command or "vision-attribution-serve" in command:
        found.append(pwd.getpwuid(uid).pw_name)
print(" ".join(sorted(set(found))) if sys.argv[1] == "users" else len(found))
"""

REQUESTS_SCRIPT = r"""
import json, os, pathlib, urllib.request
import matplotlib.cbook
properties = dict(line.split("=", 1) for line in pathlib.Path(os.environ["TS_CONFIG_FILE"]).read_text().splitlines() if "=" in line and not line.startswith("#"))
inference = properties["inference_address"].replace("0.0.0.0", "127.0.0.1")
key = json.loads(pathlib.Path("key_file.json").read_text())["inference"]["key"]
photo = pathlib.Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes()
def post(model, headers):
    request = urllib.request.Request(f"{inference}/predictions/{model}", data=photo, headers={"Content-Type": "image/jpeg", **headers})
    try:
        with urllib.request.urlopen(request, timeout=300) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()
for mar in sorted(pathlib.Path(properties["model_store"]).glob("*.mar")):
    status, kind, body = post(mar.stem, {"Authorization": f"Bearer {key}"})
    print(f"POST /predictions/{mar.stem} (grace_hopper.jpg): {status} {kind} {len(body)} bytes"
          + (f", predicted {json.loads(body)['predicted_name']!r}" if status == 200 and kind == "application/json" else "")
          + ("" if status == 200 else f": {body[:300]!r}"))
print(f"without the token: {post(mar.stem, {})[0]}")
"""


def serve_and_check(build: RootBuild, config: dict) -> list[str]:
    root = build.root
    uid, gid = build.uid(config["user"])
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in config["env"].items())
    entrypoint = " ".join(shlex.quote(part) for part in json.loads(config["entrypoint"]))  # the exec (JSON) form
    healthcheck = " ".join(shlex.quote(part) for part in json.loads(config["healthcheck"]))
    proof = root / "proof"
    proof.mkdir(exist_ok=True)
    (proof / "run.sh").write_text(RUN_SCRIPT.format(workdir=config["workdir"], uid=uid, gid=gid, env=env, entrypoint=entrypoint, healthcheck=healthcheck))
    (proof / "requests.py").write_text(REQUESTS_SCRIPT)
    (proof / "processes.py").write_text(PROCESSES_SCRIPT)
    os.chmod(proof, 0o777)
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tvision-attribution\n")  # as Docker writes it
    (root / "etc/hostname").write_text("vision-attribution\n")
    log("serving: unshare --pid --mount --net, lo up, chroot, the image's ENTRYPOINT as its USER")
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--net", "--uts", f"--mount-proc={root / 'proc'}", "sh", "-c",
         f"hostname vision-attribution && ip link set lo up && mount --bind /dev {root / 'dev'} && exec chroot {root} /bin/sh /proof/run.sh"],
        capture_output=True, text=True, timeout=1800,
    )
    lines = (done.stdout + done.stderr).splitlines()
    for line in lines:
        log(f"  {line}")
    return lines


def mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve()) + "/"
    return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines() if line.split()[1].startswith(prefix)]


def unmount_all(root: Path) -> None:
    for mountpoint in sorted(mounts_under(root), key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/var/tmp/vision-attribution-rootfs/root"))
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--build-arg", action="append", default=[], help="NAME=VALUE, as docker build takes it")
    parser.add_argument("--keep", action="store_true", help="keep the root (and the cache beside it) afterwards")
    args = parser.parse_args()
    root, cache = args.root, args.root.parent / "cache"
    build_args = dict(item.split("=", 1) for item in args.build_arg)
    global_args, all_stages = stages(instructions(REPO / "Dockerfile"))
    order = needed_stages(args.target, all_stages)
    log(f"stages for target {args.target}: {' -> '.join(order)}")
    try:
        if not (root / "etc/debian_version").exists():
            if not shutil.which("debootstrap"):
                run(["apt-get", "install", "-y", "-qq", "debootstrap"])
            log(f"debootstrap bookworm into {root}")
            run(["debootstrap", "--variant=minbase", "bookworm", str(root)], stdout=subprocess.DEVNULL)  # Debian's default mirror
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        run(["mount", "-t", "proc", "proc", str(root / "proc")])  # as a build container has them
        run(["mount", "--bind", "/dev", str(root / "dev")])
        build = RootBuild(root, cache, build_args)
        log(f"base image stand-in: apt-get install {' '.join(BASE_PACKAGES)}")
        build.run_step(f"apt-get update -qq && apt-get install -y -qq --no-install-recommends {' '.join(BASE_PACKAGES)} >/dev/null", {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}, "root", "/")
        for certificate in HOST_CAS.glob("*.crt"):
            shutil.copy(certificate, root / "usr/local/share/ca-certificates" / certificate.name)
        build.run_step("update-ca-certificates >/dev/null", {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, "root", "/")
        by_name = {stage["name"]: stage for stage in all_stages}
        configs = {}
        base_config = {"env": {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}, "user": "root", "workdir": "/"}
        for name in order:
            stage = by_name[name]
            log(f"stage {name} (FROM {stage['parent']})")
            configs[name] = build.stage(stage, configs.get(stage["parent"], base_config), global_args)
        final = configs[args.target]
        log("the image's Python environment: " + subprocess.run(
            ["chroot", str(root), "/opt/venv/bin/python", "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout.replace("\n", " ")[:4000])
        unmount_all(root)
        results = serve_and_check(build, final)
    finally:
        unmount_all(root)
        if not args.keep and not mounts_under(root):  # never delete through a bind mount of the host's /dev
            log(f"removing {root.parent}")
            shutil.rmtree(root.parent, ignore_errors=True)
    text = "\n".join(results)
    failures = []
    if "ready after never" in text:
        failures.append("the HEALTHCHECK never passed")
    if "never unready" in text:
        failures.append("the HEALTHCHECK passed before the workers could be READY")
    if not re.search(r"init exit status 0", text):
        failures.append("the entry point did not exit 0 on SIGTERM")
    if "processes left: 0" not in text:
        failures.append("TorchServe processes survived SIGTERM")
    if "root" in next((line for line in results if line.startswith("users of")), "root"):
        failures.append("a server process runs as root")
    if not re.search(r"without the token: 40[01]", text):
        failures.append("a request without the token was not refused")
    if re.search(r"POST /predictions/\S+ \(grace_hopper.jpg\): (?!200)", text) or "POST /predictions" not in text:
        failures.append("an archive did not answer its prediction")
    for failure in failures:
        log(f"FAILED: {failure}")
    log("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
