"""SpineOne lumbar spine bundle: one-stage detection and grading of lumbar discs and vertebrae on sagittal MRI.

The configs in ``configs/`` name the parts exported here (``bundle.SpineOne``, ``bundle.SpineOneLoss``, ...).
"""

from bundle.augment import RandFieldOfViewd
from bundle.codec import OCPCCodec, mm_to_pixels, pixels_to_mm
from bundle.decoding import hough_voting
from bundle.engines import EvaluationBatch, TrainingBatch
from bundle.errors import BundleInputError
from bundle.handlers import (
    InferenceOptimizer,
    KeypointDetectionMetric,
    MetricsWriter,
    ObjectiveAssociationHandler,
    TrainingStateCheckpoint,
)
from bundle.intensity import ScaleIntensityPercentilesd
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
from bundle.transforms import KeypointsDecoded, KeypointsToArraysd, OCPCTargetsd

__version__ = "0.2.0"

__all__ = [
    "AutocastInferer",
    "BundleInputError",
    "ChannelAttention",
    "EvaluationBatch",
    "InPlaneSpacingd",
    "InferenceOptimizer",
    "KeypointDetectionMetric",
    "KeypointMetric",
    "KeypointsDecoded",
    "KeypointsToArraysd",
    "KeypointsWriter",
    "LoadSagittalSeriesd",
    "MetricsWriter",
    "OCPCCodec",
    "OCPCTargetsd",
    "ObjectiveAssociationHandler",
    "PositionAttention",
    "RandFieldOfViewd",
    "RSNA_STREAMS",
    "RsnaScoreHandler",
    "ScaleIntensityPercentilesd",
    "SpineOne",
    "SpineOneLoss",
    "StreamSpec",
    "TIANCHI_STREAMS",
    "TrainingBatch",
    "TrainingStateCheckpoint",
    "build_rsna_datalist",
    "build_tianchi_datalist",
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
]
