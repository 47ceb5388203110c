"""MONAI Label 0.8.5 app serving the SpineOne bundle it is shipped in (this file's ``../..``), offline.

Start it from a packaged copy (docs/README.md, MONAI Label), MONAI Label's environment active:
    MONAI_LABEL_DATASTORE_FILE_EXT='["*.series"]' python -m monailabel.main start_server \\
        --app COPY/scripts/monailabel_app --studies STUDIES --conf models spineone

``--conf models`` names the models to serve, comma-separated, or ``all``; default ``spineone`` alone (as
before). The names (``bundle.monailabel.SERVED_MODELS``): ``spineone`` (sagittal T2, spinal canal stenosis:
``configs/inference.json``, ``models/model.pt``), ``spineone_sagittal_t1`` (neural foraminal narrowing:
``configs/inference_sagittal_t1.json`` merged after inference.json, ``models/sagittal_t1/model.pt``) and
``spineone_axial_t2`` (subarticular stenosis: ``configs/inference_axial_t2.json``, ``models/axial_t2/model.pt``).
Each is MONAI Label's ``BundleInferTask`` (as the ``monaibundle`` sample app serves a local bundle) reading
the merged config, without trainers or SAM2. Unlike that app, a request whose image id is not in the
datastore gets HTTP 404 naming that id (``bundle.monailabel.check_image_id``) before MONAI Label replaces
the unknown id by an empty path, and no label is written.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import monailabel
from monai.bundle import ConfigParser
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

logger = logging.getLogger(__name__)
BUNDLE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "spineone"
if str(BUNDLE_ROOT) not in sys.path:  # the configs import the ``bundle`` package: no PYTHONPATH needed
    sys.path.insert(0, str(BUNDLE_ROOT))

from bundle.monailabel import (  # noqa: E402
    SERVED_MODELS,
    check_image_id,
    read_served_config,
    served_keys,
    served_weights,
)


class SpineOneConstants(BundleConstants):
    """MONAI Label's names for one served model: its override file, weights and config keys (read from the
    merged config by :class:`SpineOneInferTask`)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.weights = "model.pt"
        self.keys = {"preprocessing": "preprocessing", "inferer": "inferer", "postprocessing": "postprocessing"}

    def configs(self) -> list[str]:
        return [SERVED_MODELS[self.model] or "inference.json"]

    def model_pytorch(self) -> str:
        return self.weights

    def key_preprocessing(self) -> list[str]:
        return [self.keys["preprocessing"]]

    def key_inferer(self) -> list[str]:
        return [self.keys["inferer"]]

    def key_postprocessing(self) -> list[str]:
        return [self.keys["postprocessing"]]


class SpineOneInferTask(BundleInferTask):
    """``BundleInferTask`` on the merged config of one served model (MONAI Label reads a single file)."""

    def __init__(self, model: str, conf: dict[str, str]) -> None:
        super().__init__(str(BUNDLE_ROOT), conf, const=SpineOneConstants(model), type="segmentation")

    def _load_bundle_config(self, path: str, config: str) -> ConfigParser:
        parser = read_served_config(path, self.const.model)
        self.const.weights = served_weights(parser, path)
        self.const.keys = served_keys(parser)
        return parser


def served_names(value: str | None) -> list[str]:
    """The model names of ``--conf models``: comma-separated, ``all`` for every served model."""
    names = [n.strip() for n in (value or DEFAULT_MODEL).split(",") if n.strip()]
    names = list(SERVED_MODELS) if names == ["all"] else names
    unknown = [n for n in names if n not in SERVED_MODELS]
    if unknown or not names:
        raise ValueError(f"--conf models {value!r}: the bundle {BUNDLE_ROOT} serves {', '.join(SERVED_MODELS)} or all")
    return list(dict.fromkeys(names))


class SpineOneApp(MONAILabelApp):
    """The bundle at ``BUNDLE_ROOT`` as segmentation-type models; refuses image ids not in the datastore."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.model_names = served_names(conf.get("models"))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"SpineOne ({BUNDLE_ROOT.name}) - MONAI Label {monailabel.__version__}",
            description="Lumbar disc keypoints and degeneration grades from the SpineOne bundle",
            version=monailabel.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        tasks = {}
        for name in self.model_names:
            tasks[name] = SpineOneInferTask(name, self.conf)
            logger.info(f"+++ Adding Inferer:: {name} => {BUNDLE_ROOT} ({tasks[name].const.weights})")
        return tasks

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """MONAI Label's ``infer`` after checking that a named image (not a file path) is in the datastore."""
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):  # MONAI Label's own test for "an image id"
            check_image_id(image, (datastore or self.datastore()).list_images(), self.studies)
        return super().infer(request, datastore)
