"""One TorchServe for all serving tests of a run (tests/serving/conftest.py's session fixture `shared_torchserve`).

It starts with no model. A module asks for the archives it needs:

- `serve(*names)`: archives of SHARED_ARCHIVES, which several modules use with the same model-config. Each is built
  once per run into the server's model store the first time a module asks for it, registered through the
  management API, and kept for the rest of the run.
- `private({name: builder})`: a context manager for archives only one module uses (its own checkpoints or
  settings): built into the same model store by the module's builders, registered, and unregistered and deleted when
  the module is done, so that the server holds only what the running modules need.

Modules that need a server-wide setting of their own (the KServe v2 envelope, short-lived tokens) start their own
TorchServe instead (torchserve_harness.TorchServe).
"""
import contextlib
import functools
from pathlib import Path
from typing import Callable, Iterator

from checkpoint_files import write_deeplab_checkpoint, write_lanet_checkpoint, write_swin_fork_checkpoint, write_tensormask_checkpoint
from dextr_data import write_pickled_dextr_model
from framework_configs import BASE_TENSORMASK_YAML, SMALL_SWIN_CONFIG, SMALL_TENSORMASK_YAML
from torchserve_harness import TorchServe, build_archive, build_in_parallel, shipped_model_config

BATCHING = {"minWorkers": 1, "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 50, "responseTimeout": 300}
"""TorchServe settings of the shared classifier and segmenter archives: batching on (4 requests, 50 ms)."""
LANET_RESPONSE_LIMIT = 3_000_000
"""lanet's attribution.max_response_bytes: 50-step seed replies fit, 200 steps do not (test_serving_classifiers)."""
TENSORMASK_STEPS = 3
SWIN_STEPS = 2
DEXTR_BOX_LOGIT = 8.0
"""The dextr archive's logit everywhere in the crop (its mask is exactly the pasted crop, test_dextr_serving)."""
DEXTR_CROP = 128


def _effnet(inputs: Path, store: Path) -> Path:
    return build_archive("effnet", store, {**shipped_model_config("effnet"), **BATCHING}, config_dir=inputs)


def _selfie(inputs: Path, store: Path) -> Path:
    return build_archive("selfie", store, {**shipped_model_config("selfie"), **BATCHING}, config_dir=inputs)


def _lanet(inputs: Path, store: Path) -> Path:
    """LaNet at C=16, 8 layers, from a checkpoint in the layout LaNet's training script writes (top1.pt)."""
    config = {**shipped_model_config("lanet"), **BATCHING}
    config["attribution"]["max_response_bytes"] = LANET_RESPONSE_LIMIT
    return build_archive("lanet", store, config, write_lanet_checkpoint(inputs / "top1.pt"), config_dir=inputs)


def _tensormask(inputs: Path, store: Path) -> Path:
    """TensorMask R50-FPN with random weights whose scores straddle 0.5, from a detectron2 model-zoo pickle and a
    detectron2 YAML config with a _BASE_ chain (test images at 96..160 pixels)."""
    checkpoint = write_tensormask_checkpoint(inputs / "model_final.pkl", model_zoo_pickle=True)
    (inputs / "Base-TensorMask.yaml").write_text(BASE_TENSORMASK_YAML)
    (inputs / "tensormask_small.yaml").write_text(SMALL_TENSORMASK_YAML)
    config = {**shipped_model_config("tensormask"), **BATCHING}
    config["attribution"].update(n_steps=TENSORMASK_STEPS, internal_batch_size=TENSORMASK_STEPS)
    return build_archive("tensormask", store, config, checkpoint, ("--config", str(inputs / "tensormask_small.yaml")), config_dir=inputs)


def _swin(inputs: Path, store: Path) -> Path:
    """Swin-T Cascade Mask R-CNN from a checkpoint in the seed fork's layout and a user's mmdet 3 config at 192x128,
    batches of 2 (an explanation and a prediction together); the checkpoint is deleted once the archive is built."""
    checkpoint = write_swin_fork_checkpoint(inputs / "cascade_mask_rcnn_swin_tiny_patch4_window7.pth")
    (inputs / "swin_small.py").write_text(SMALL_SWIN_CONFIG)
    config = shipped_model_config("swin")
    config["attribution"].update(n_steps=SWIN_STEPS, internal_batch_size=SWIN_STEPS)
    config.update(batchSize=2, maxBatchDelay=1000)
    archive = build_archive("swin", store, config, checkpoint, ("--config", str(inputs / "swin_small.py")), config_dir=inputs)
    checkpoint.unlink()
    return archive


def _deeplab(inputs: Path, store: Path) -> Path:
    """DeepLabV3 MobileNetV3 from a file in torchvision's published layout and name (weights from torchvision's own
    constructor), one worker."""
    config = {**shipped_model_config("deeplab"), "minWorkers": 1, "maxWorkers": 1}
    return build_archive("deeplab", store, config, write_deeplab_checkpoint(inputs, "mobile"), ("--model-type", "mobile"), config_dir=inputs)


def _dextr(inputs: Path, store: Path) -> Path:
    """DEXTR from the published checkpoint's format (a whole pickled DextrModel) at 128x128 crops, its classifier a
    constant logit DEXTR_BOX_LOGIT, one worker."""
    checkpoint = write_pickled_dextr_model(inputs / "dextr_pascalvoc_resunet101-a2d81727.pth", size=DEXTR_CROP, padding=10, sigma=10.0, constant_logit=DEXTR_BOX_LOGIT)
    config = {**shipped_model_config("dextr"), "minWorkers": 1, "maxWorkers": 1}
    return build_archive("dextr", store, config, checkpoint, ("--trust-checkpoint",), config_dir=inputs)


SHARED_ARCHIVES: dict[str, Callable[[Path, Path], Path]] = {
    "effnet": _effnet,  # test_serving_classifiers, test_reliability
    "selfie": _selfie,  # test_serving_selfie, test_reliability
    "lanet": _lanet,  # test_serving_classifiers, test_reliability
    "tensormask": _tensormask,  # test_serving_tensormask, test_reliability, test_gateway
    "swin": _swin,  # test_serving_swin, test_gateway, test_corpus
    "deeplab": _deeplab,  # test_gateway, test_corpus
    "dextr": _dextr,  # test_dextr_serving, test_corpus
}
"""Archive name -> builder(inputs folder, model store) -> the .mar it wrote."""


class SharedTorchServe:
    def __init__(self, server: TorchServe, workdir: Path):
        self.server, self.workdir = server, workdir
        self.store = workdir / "model_store"
        self.archives: dict[str, Path] = {}
        self.owners: dict[str, str] = {}  # registered model -> "shared" or the private archive's owner

    def inputs(self, name: str) -> Path:
        """The folder of a shared archive's inputs (its checkpoint under the user's file name, its configs)."""
        folder = self.workdir / "archive-inputs" / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def serve(self, *names: str) -> TorchServe:
        """The server, with the named shared archives built (once per run) and registered."""
        missing = [name for name in names if name not in self.server.models]
        for name in missing:
            if self.owners.get(name, "shared") != "shared":
                raise RuntimeError(f"model {name!r} is registered by {self.owners[name]}, not as the shared archive")
        unbuilt = {name: functools.partial(SHARED_ARCHIVES[name], self.inputs(name), self.store) for name in missing if name not in self.archives}
        self.archives.update(build_in_parallel(unbuilt))
        self.owners.update(dict.fromkeys(missing, "shared"))
        self.server.register(missing)
        return self.server

    def archive(self, name: str) -> Path:
        """The .mar of a shared archive that `serve` built."""
        return self.archives[name]

    @contextlib.contextmanager
    def private(self, builders: dict[str, Callable[[Path], Path]], owner: str = "a module") -> Iterator[TorchServe]:
        """Archives of one module: builders[name](model store) writes NAME.mar into the store; all are registered for
        the `with` block, then unregistered and deleted."""
        for name in builders:
            if name in self.owners:
                raise RuntimeError(f"model {name!r} is already registered by {self.owners[name]}")
        self.owners.update(dict.fromkeys(builders, owner))
        try:
            build_in_parallel({name: functools.partial(builder, self.store) for name, builder in builders.items()})
            self.server.register(list(builders))
            yield self.server
        finally:
            for name in builders:
                if name in self.server.models:
                    self.server.unregister(name)
                del self.owners[name]
                (self.store / f"{name}.mar").unlink(missing_ok=True)
