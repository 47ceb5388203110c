"""MONAI Label 0.8.5 app serving the SpineOne bundle it is shipped in (this file's ``../..``), offline.

Start it from a packaged copy (docs/README.md, MONAI Label), MONAI Label's environment active:
    MONAI_LABEL_DATASTORE_FILE_EXT='["*.series"]' python -m monailabel.main start_server \\
        --app COPY/scripts/monailabel_app --studies STUDIES --conf models spineone

It serves the bundle as the ``monaibundle`` sample app serves a local bundle (MONAI Label's
``BundleInferTask`` on ``configs/inference.json`` and ``models/model.pt``), under the one name given by
``--conf models`` (default ``spineone``), without trainers or SAM2. Unlike that app, a request whose image
id is not in the datastore gets HTTP 404 naming that id (``bundle.monailabel.check_image_id``) before MONAI
Label replaces the unknown id by an empty path, and no label is written.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.tasks.infer.bundle import BundleInferTask

logger = logging.getLogger(__name__)
BUNDLE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "spineone"


class SpineOneApp(MONAILabelApp):
    """The bundle at ``BUNDLE_ROOT`` as one segmentation-type model; refuses image ids not in the datastore."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.model_name = (conf.get("models") or DEFAULT_MODEL).strip()
        if "," in self.model_name:
            raise ValueError(f"--conf models {self.model_name!r}: this app serves one model, the bundle {BUNDLE_ROOT}")
        if str(BUNDLE_ROOT) not in sys.path:  # the configs import the ``bundle`` package: no PYTHONPATH needed
            sys.path.insert(0, str(BUNDLE_ROOT))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"SpineOne ({BUNDLE_ROOT.name}) - MONAI Label {monailabel.__version__}",
            description="Lumbar disc keypoints and degeneration grades from the SpineOne bundle",
            version=monailabel.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        task = BundleInferTask(str(BUNDLE_ROOT), self.conf, type="segmentation")
        logger.info(f"+++ Adding Inferer:: {self.model_name} => {BUNDLE_ROOT}")
        return {self.model_name: task}

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """MONAI Label's ``infer`` after checking that a named image (not a file path) is in the datastore."""
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image):  # MONAI Label's own test for "an image id"
            from bundle.monailabel import check_image_id

            check_image_id(image, (datastore or self.datastore()).list_images(), self.studies)
        return super().infer(request, datastore)
