"""Build a TorchServe model archive (.mar): validate, convert and load everything first, then package.

    python -m vision_attribution.archives.build NAME --handler FILE --configs DIR [--checkpoint FILE]
        [--config FILE] [--model-config FILE] [--out DIR] [--name NAME] [--trust-checkpoint] [--SETTING VALUE ...]

(archive.sh passes --handler and --configs.) The model-config is validated, the checkpoint (any file name)
is read, converted to a plain state dict and loaded strictly, and the staged archive is loaded once the way a
worker will load it; any problem is reported with its cause and exit status 2, and no archive is written.
torch-model-archiver writes into a private directory inside --out; the archive is opened and its members checked,
then renamed over OUT/NAME.mar in one step, so an existing archive is replaced only by a complete one and two
builds of one name at once never mix their files.
"""
import argparse
import importlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import yaml

from ..serving.settings import ConfigError, read_model_config
from . import ARCHIVES, MANIFEST_FILE, StageInputs, archive_module, load_service

class BuildError(Exception):
    """Why an archive cannot be built; archive.sh prints it and exits with status 2."""


def read_yaml(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise BuildError(f"cannot read the model-config {path}: {error}") from error
    if config is not None and not isinstance(config, dict):
        raise BuildError(f"the model-config {path} must be a YAML mapping")
    return config or {}


def stage_archive(name: str, workdir: Path, model_config: dict, checkpoint: Path | None, framework_config: Path | None, trust: bool) -> list[Path]:
    """Validate and convert into `workdir`; returns the files to ship besides the weights. Raises BuildError."""
    module = archive_module(name)
    refuse_missing_requirements(name, getattr(module, "REQUIRES", ()))
    try:
        _, model_settings = read_model_config(model_config, module.MODEL_SETTINGS)
    except ConfigError as error:
        raise BuildError(str(error)) from error
    if checkpoint is None and module.CHECKPOINT == "required":
        raise BuildError(f"{name} needs --checkpoint FILE: no weights for it exist offline ({module.SUMMARY})")
    if checkpoint is not None and not checkpoint.is_file():
        raise BuildError(f"the checkpoint {checkpoint} does not exist")
    if framework_config is not None and module.FRAMEWORK_CONFIG is None:
        takers = [other for other in ARCHIVES if archive_module(other).FRAMEWORK_CONFIG]
        raise BuildError(f"{name} takes no --config; the archives that do are {takers}")
    if framework_config is not None and not framework_config.is_file():
        raise BuildError(f"the config {framework_config} does not exist")
    inputs = StageInputs(checkpoint, framework_config, model_settings, trust, workdir)
    try:
        extra_files = module.stage(inputs)
    except (ValueError, KeyError, pickle.UnpicklingError, EOFError) as error:
        source = f"the checkpoint {checkpoint}" if checkpoint else "the default weights"
        raise BuildError(f"{source} cannot be served by the {name} archive: {error}") from error
    manifest = workdir / MANIFEST_FILE
    manifest.write_text(json.dumps({"archive": name}))
    try:  # exactly what a worker will do
        load_service(workdir, model_config, torch.device("cpu"))
    except Exception as error:  # noqa: BLE001 - report any reason the workers would not start
        raise BuildError(f"the staged {name} archive does not load as a worker would load it: {type(error).__name__}: {error}") from error
    return [manifest, *extra_files]


def refuse_missing_requirements(name: str, modules: tuple[str, ...]) -> None:
    """BuildError, in one line that says what to run, when a module the archive needs does not import."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise BuildError(
                f"the {name} archive needs {', '.join(modules)}, which the serving core's ./setup.sh does not install "
                f"({error}); run ./setup.sh --all (it builds mmcv once: about 20 minutes on 2 cores)"
            ) from None


def setting_options(archives: tuple[str, ...] = ARCHIVES) -> dict[str, str]:
    """The `model:` settings of `archives` (default: every archive) as command-line options: {setting key: --option-name}."""
    keys = sorted({key for name in archives for key in archive_module(name).MODEL_SETTINGS})
    return {key: "--" + key.replace("_", "-") for key in keys}


def with_command_line_settings(name: str, model_config: dict, given: dict) -> dict:
    """The model-config with the `model:` settings given on the command line (YAML scalars) in place."""
    if not given:
        return model_config
    known = archive_module(name).MODEL_SETTINGS
    foreign = sorted(setting_options()[key] for key in given if key not in known)
    if foreign:
        allowed = ", ".join(setting_options()[key] for key in known) or "none"
        raise BuildError(f"{name} has no setting {', '.join(foreign)}; its settings are: {allowed}")
    section = model_config.get("model") or {}
    if not isinstance(section, dict):
        raise BuildError(f"the model-config's 'model:' must be a mapping of settings, got {section!r}")
    parsed = {key: yaml.safe_load(text) for key, text in given.items()}
    return {**model_config, "model": {**section, **parsed}}


def build(args: argparse.Namespace) -> Path:
    config_path = args.model_config or args.configs / f"{args.archive}.yaml"
    given = {name.removeprefix("setting_"): value for name, value in vars(args).items() if name.startswith("setting_") and value is not None}
    model_config = with_command_line_settings(args.archive, read_yaml(config_path), given)
    with tempfile.TemporaryDirectory(prefix=f"{args.archive}-stage-") as stage:
        workdir = Path(stage)
        if args.kserve_v2:  # TorchServe's kservev2 envelope answers only the first request of a batch
            model_config["batchSize"] = 1
            config_path = workdir / "model-config.yaml"
            config_path.write_text(yaml.safe_dump(model_config, sort_keys=False))
        extra_files = stage_archive(args.archive, workdir, model_config, args.checkpoint, args.config, args.trust_checkpoint)
        if given:  # the worker reads the settings from the archive's model-config
            config_path = workdir / "model-config.yaml"
            config_path.write_text(yaml.safe_dump(model_config, sort_keys=False))
        name = args.name or args.archive
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{name}.mar-", dir=args.out) as export:
            command = [
                sys.executable, "-m", "model_archiver.model_packaging",
                "--model-name", name, "--version", "1.0", "--export-path", export,
                "--handler", str(args.handler), "--serialized-file", str(workdir / "weights.pt"),
                "--extra-files", ",".join(str(path) for path in extra_files), "--config-file", str(config_path),
            ]  # fmt: skip
            # torch-model-archiver copies the files into $TMPDIR/NAME, shared by every build of NAME: give it its own
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TMPDIR": stage})
            if done.returncode != 0:
                raise BuildError(f"torch-model-archiver failed:\n{done.stdout}{done.stderr}")
            built = Path(export) / f"{name}.mar"
            check_members(built, [args.handler, workdir / "weights.pt", config_path, *extra_files])
            built.replace(args.out / f"{name}.mar")
    return args.out / f"{name}.mar"


def check_members(archive: Path, files: list[Path]) -> None:
    """BuildError unless `archive` opens as a zip whose members pass their CRC check and include TorchServe's
    manifest and each of `files` by name, as large as the file."""
    try:
        with zipfile.ZipFile(archive) as mar:
            damaged = mar.testzip()
            sizes = {info.filename: info.file_size for info in mar.infolist()}
    except (OSError, zipfile.BadZipFile) as error:
        raise BuildError(f"torch-model-archiver wrote an unreadable {archive.name}: {error}") from error
    if damaged is not None:
        raise BuildError(f"torch-model-archiver wrote {archive.name} with a damaged member {damaged}")
    expected = {"MAR-INF/MANIFEST.json": None, **{path.name: path.stat().st_size for path in files}}
    wrong = [member for member, size in expected.items() if member not in sizes or (size is not None and sizes[member] != size)]
    if wrong:
        raise BuildError(f"torch-model-archiver wrote {archive.name} without a complete {', '.join(wrong)}")


def chosen_archive(argv: list[str]) -> str | None:
    """The archive a command line builds, read without importing any archive module; None when it asks for help or
    is unclear (then every archive's options are read)."""
    if {"-h", "--help"} & set(argv):
        return None
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("archive", nargs="?")
    for option in ("--checkpoint", "--config", "--model-config", "--out", "--name", "--handler", "--configs"):
        p.add_argument(option)
    known, _ = p.parse_known_args(argv)
    return known.archive if known.archive in ARCHIVES else None


def parser(archives: tuple[str, ...] = ARCHIVES) -> argparse.ArgumentParser:
    """archive.sh's options, with the settings of `archives` (default: every archive; importing an archive's module
    imports its network, some seconds for those on torchvision's detection ops)."""
    listing = "\n".join(f"  {name:<11} {archive_module(name).SUMMARY}" for name in archives)
    p = argparse.ArgumentParser(prog="archive.sh", description=f"Build a TorchServe model archive.\n\narchives:\n{listing}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", choices=ARCHIVES, metavar="ARCHIVE")
    p.add_argument("--checkpoint", type=Path, help="the weights, any file name (required where no offline weights exist)")
    takers = "; ".join(f"{name}: {archive_module(name).FRAMEWORK_CONFIG}" for name in archives if archive_module(name).FRAMEWORK_CONFIG)
    p.add_argument("--config", type=Path, help=f"the framework's own model config ({takers})")
    p.add_argument("--model-config", type=Path, help="replaces vision_attribution/archives/configs/ARCHIVE.yaml (TorchServe keys, attribution:, model:)")
    p.add_argument("--out", type=Path, default=Path("model_store"), help="where to write ARCHIVE.mar (model_store)")
    p.add_argument("--name", help="the archive's model name (default: ARCHIVE), e.g. to serve two variants side by side")
    p.add_argument("--kserve-v2", action="store_true", help="for service_envelope=kservev2 (KServe v2): batchSize 1, the envelope serves no batches")
    p.add_argument("--trust-checkpoint", action="store_true", help="unpickle the checkpoint fully (runs code from the file): only for files you trust")
    for key, option in setting_options(archives).items():
        owners = [name for name in archives if key in archive_module(name).MODEL_SETTINGS]
        setting = archive_module(owners[0]).MODEL_SETTINGS[key]
        p.add_argument(option, dest=f"setting_{key}", metavar="VALUE", help=f"{'/'.join(owners)}: model setting {key}, {setting.help} (default {setting.default})")
    p.add_argument("--handler", type=Path, required=True, help=argparse.SUPPRESS)
    p.add_argument("--configs", type=Path, required=True, help=argparse.SUPPRESS)
    return p


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The command line, read with the chosen archive's options only where that is enough: anything it does not
    know (another archive's setting, say) is read again with every archive's, for the full message."""
    chosen = chosen_archive(argv)
    if chosen is not None:
        args, unknown = parser((chosen,)).parse_known_args(argv)
        if not unknown:
            return args
    return parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(sys.argv[1:] if argv is None else list(argv))
    try:
        path = build(args)
    except BuildError as error:
        print(f"archive.sh: {error}", file=sys.stderr)
        return 2
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
