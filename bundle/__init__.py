"""SpineOne lumbar spine bundle: one-stage detection and grading of lumbar discs and vertebrae on sagittal MRI.

The configs in ``configs/`` name the parts exported here (``bundle.SpineOne``, ``bundle.SpineOneLoss``, ...).
"""

from bundle.codec import mm_to_pixels, pixels_to_mm
from bundle.decoding import decode_keypoints, hough_voting
from bundle.engines import SpineOneEvalStep, SpineOneTrainStep, target_keys
from bundle.errors import BundleInputError
from bundle.handlers import (
    InferenceOptimizer,
    KeypointDetectionMetric,
    MetricsWriter,
    ObjectiveAssociationHandler,
    TrainingStateCheckpoint,
)
from bundle.io import (
    InPlaneSpacingd,
    LoadSagittalSeriesd,
    build_rsna_datalist,
    build_tianchi_datalist,
    load_sagittal_series,
    select_sagittal_t2,
    split_folds,
)
from bundle.losses import SpineOneLoss, oa_weights
from bundle.metrics import KeypointMetric
from bundle.networks import ChannelAttention, PositionAttention, SpineOne
from bundle.outputs import KeypointsWriter, RsnaScoreHandler, read_rsna_prior
from bundle.precision import AutocastInferer, resolve_precision
from bundle.rsna_metric import rsna_score
from bundle.streams import RSNA_STREAMS, TIANCHI_STREAMS, StreamSpec, parse_streams, split_output
from bundle.studies import find_studies
from bundle.targets import KeypointsToArraysd, OCPCTargetsd

__version__ = "0.1.0"

__all__ = [
    "AutocastInferer",
    "BundleInputError",
    "ChannelAttention",
    "InPlaneSpacingd",
    "InferenceOptimizer",
    "KeypointDetectionMetric",
    "KeypointMetric",
    "KeypointsToArraysd",
    "KeypointsWriter",
    "LoadSagittalSeriesd",
    "MetricsWriter",
    "OCPCTargetsd",
    "ObjectiveAssociationHandler",
    "PositionAttention",
    "RSNA_STREAMS",
    "RsnaScoreHandler",
    "SpineOne",
    "SpineOneEvalStep",
    "SpineOneLoss",
    "SpineOneTrainStep",
    "StreamSpec",
    "TIANCHI_STREAMS",
    "TrainingStateCheckpoint",
    "build_rsna_datalist",
    "build_tianchi_datalist",
    "decode_keypoints",
    "find_studies",
    "hough_voting",
    "load_sagittal_series",
    "mm_to_pixels",
    "oa_weights",
    "parse_streams",
    "pixels_to_mm",
    "read_rsna_prior",
    "resolve_precision",
    "rsna_score",
    "select_sagittal_t2",
    "split_folds",
    "split_output",
    "target_keys",
]
