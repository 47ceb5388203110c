"""MONAI Label postprocessing and image-id check, and the served sagittal T1 / axial T2 pipelines run as MONAI
Label runs them (default run), then a real MONAI Label 0.8.5 server (opt-in, marker ``monailabel``) with the
shipped app (scripts/monailabel_app, all three models) and with MONAI Label's ``monaibundle`` sample app.

The server tests run the server with ``SPINEONE_MONAILABEL_PYTHON`` (default: this interpreter), which must
have requirements-monailabel.txt installed; pytest itself runs in the bundle's environment (requirements-dev.txt)
or in MONAI Label's. From the repository root, with ``ML`` the MONAI Label environment (docs/README.md):
    SPINEONE_MONAILABEL=1 SPINEONE_MONAILABEL_PYTHON=$ML/bin/python .venv/bin/python -m pytest -q tests/test_monailabel.py
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle.codec import OCPCCodec
from bundle.errors import BundleInputError, MissingInputError
from bundle.io.axial import parallel_blocks
from bundle.io.dicom_series import list_dicom_files, pixel_to_patient, read_slice_headers, sort_series
from bundle.io.rsna import read_rsna_series
from bundle.monailabel import (
    SERVED_MODELS,
    KeypointsToLabeld,
    axial_block_points_mm,
    check_image_id,
    label_values,
    read_served_config,
    served_keys,
    served_weights,
)
from bundle.rsna_labels import LEVELS
from bundle.streams import RSNA_STREAMS
from bundle.transforms import KeypointsDecoded
from bundle.workflow import default_streams
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose
from stream_fixtures import streams

ROOT = Path(__file__).resolve().parents[1]
STREAMS = {
    "disc": {"levels": ["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"], "classes": ["Normal/Mild", "Moderate", "Severe"]}
}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _sagittal_affine(spacing: float, origin: tuple[float, float, float]) -> np.ndarray:
    """(row, col, k) -> LPS mm for a sagittal plane: rows go feet-ward (-z), columns go anterior (-y)."""
    affine = np.eye(4)
    affine[:3, 0] = [0.0, 0.0, -spacing]
    affine[:3, 1] = [0.0, -spacing, 0.0]
    affine[:3, 2] = [1.0, 0.0, 0.0]
    affine[:3, 3] = origin
    return affine


def _peaked_output(peaks: list[tuple[int, int, int]], grid: int = 16) -> torch.Tensor:
    """Network output (10, grid, grid): heatmap logits +20 on 3x3 blocks centred at (row, col) for class c,
    -1e4 (p = 0) elsewhere, zero offsets, no level cue (NaN)."""
    out = torch.zeros(10, grid, grid)
    out[:3] = -1e4
    out[9] = float("nan")
    for row, col, c in peaks:
        out[c, row - 1 : row + 2, col - 1 : col + 2] = 20.0
    return out


def test_label_values_order():
    values = label_values({**STREAMS, "vertebra": {"levels": ["L1", "L2"], "classes": ["n", "d"]}})
    disc = {f"disc/{level}": i for i, level in enumerate(STREAMS["disc"]["levels"], start=1)}
    assert values == {**disc, "vertebra/L1": 6, "vertebra/L2": 7}


def test_keypoints_to_label_maps_to_original_grid():
    # preprocessed grid: 64 x 64 at 2 mm; original series: 100 rows x 120 cols at 1 mm, same origin
    origin = (10.0, 50.0, 120.0)
    pre_affine, orig_affine = _sagittal_affine(2.0, origin), _sagittal_affine(1.0, origin)
    image = MetaTensor(
        torch.zeros(7, 64, 64),
        affine=torch.as_tensor(pre_affine),
        meta={
            "original_affine": orig_affine.copy(),
            "spatial_shape": np.array([100, 120]),
            "middle_instance_number": 8,
        },
    )
    pred = _peaked_output([(3, 5, 0), (9, 6, 2)])
    codec = OCPCCodec(STREAMS, radius=2.0, target_stride=1, network_stride=4)
    post = Compose([KeypointsDecoded(codec), KeypointsToLabeld("pred", codec.streams, disk_mm=3.0)])  # inference.json
    expected = codec.decode(pred.clone()[None], torch.as_tensor(pre_affine))[0]["disc"]
    out = post({"image": image, "pred": pred})
    points = out["result"]["keypoints"]
    assert len(points) == len(expected) >= 2
    assert [p["level"] for p in points] == [e["level"] for e in expected]
    assert [p["level_confidence"] for p in points] == [e["level_confidence"] for e in expected]
    assert [p["label_index"] for p in points] == [e["label"] for e in expected]
    for p, e in zip(points, expected):
        # 2 mm preprocessed pixels -> 1 mm original pixels: coordinates double, mm unchanged
        np.testing.assert_allclose([p["x"], p["y"]], 2.0 * np.asarray(e["xy"]), atol=1e-6)
        np.testing.assert_allclose(p["position_mm"], e["mm"], atol=1e-6)
        assert p["voxel"] == [p["y"], p["x"], 0.0] and p["instance_number"] == 8
        assert abs(sum(p["probabilities"].values()) - 1.0) < 1e-6
    json.dumps(out["result"])  # MONAI Label returns it as JSON

    label = out["pred"]
    assert tuple(label.shape) == (1, 100, 120, 1) and label.dtype == torch.uint8
    lab = label[0, :, :, 0].numpy()
    assert set(np.unique(lab)) == {0} | {p["value"] for p in points}
    assert [p["level"] for p in points] == ["L4/L5", "L5/S1"]  # two discs: named from the caudal end
    for p in points:
        assert p["value"] == label_values(STREAMS)[f"disc/{p['level']}"]
        assert lab[round(p["y"]), round(p["x"])] == p["value"]
    if len(points) == 2:  # disjoint disks of 3 mm radius at 1 mm spacing: about pi * 9 pixels each
        assert all(20 <= (lab == p["value"]).sum() <= 37 for p in points)
    np.testing.assert_allclose(label.affine.numpy(), LPS_TO_RAS @ orig_affine)
    # MONAI Label's Restored keeps the map (shape matches meta spatial_shape), its writer takes a RAS affine
    assert list(out["image"].meta["spatial_shape"]) == [100, 120, 1]
    np.testing.assert_allclose(out["image"].meta["original_affine"], LPS_TO_RAS @ orig_affine)
    assert out["result_extension"] == ".nii.gz"
    assert post({"image": image, "pred": pred, "result_extension": ".nrrd"})["result_extension"] == ".nrrd"


def test_keypoints_to_label_rejects_bad_input():
    with pytest.raises(ValueError, match="streams"):
        KeypointsToLabeld("pred")
    post = KeypointsToLabeld("pred", STREAMS)
    with pytest.raises(TypeError, match="MetaTensor"):
        post({"image": torch.zeros(7, 8, 8), "pred": torch.zeros(10, 2, 2), "keypoints": {}})
    image = MetaTensor(torch.zeros(7, 8, 8), meta={"original_affine": np.eye(4), "spatial_shape": np.array([8, 8])})
    with pytest.raises(KeyError, match="KeypointsDecoded"):
        post({"image": image, "pred": torch.zeros(10, 2, 2)})
    decode = KeypointsDecoded(OCPCCodec(STREAMS, network_stride=4))
    with pytest.raises(ValueError, match="one item"):
        decode({"image": image, "pred": torch.zeros(1, 10, 2, 2)})


def test_check_image_id_names_the_missing_image():
    check_image_id("b", ["a", "b"], "/studies")  # known: no error
    with pytest.raises(MissingInputError) as error:
        check_image_id("no_such_id", [f"s{i}" for i in range(7, 0, -1)], "/data/studies")
    assert error.value.status_code == 404
    assert str(error.value) == (
        "image 'no_such_id' is not in the datastore /data/studies; its images are: s1, s2, s3, s4, s5 (first 5 of 7)"
    )
    with pytest.raises(MissingInputError, match=r"image '' is not in the datastore /s; its images are: a$"):
        check_image_id("", ["a"], "/s")
    with pytest.raises(MissingInputError, match=r"'x' is not in the datastore /s; it holds no images .*\*\.series"):
        check_image_id("x", [], "/s")


def test_shipped_app_is_found_by_monai_label():
    """MONAI Label loads ``<app>/main.py`` and serves the one class whose direct base is named ``MONAILabelApp``
    (read without importing: MONAI Label is not installed here)."""
    tree = ast.parse((ROOT / "scripts" / "monailabel_app" / "main.py").read_text())
    apps = [
        n for n in tree.body if isinstance(n, ast.ClassDef) and "MONAILabelApp" in [ast.unparse(b) for b in n.bases]
    ]
    assert [a.name for a in apps] == ["SpineOneApp"]
    methods = {n.name for n in apps[0].body if isinstance(n, ast.FunctionDef)}
    assert {"init_infers", "infer"} <= methods


# ---------------------------------------------------------------- served sagittal T1 and axial T2 models

#: small network and grid for CPU tests (the server tests write the same into the copy's inference.json)
SMALL = {"backbone_depth": 18, "input_size": 128, "pixdim": 1.0, "device": "$torch.device('cpu')"}
SERIES_OF = {"spineone_sagittal_t1": "Sagittal T1", "spineone_axial_t2": "Axial T2"}


@pytest.fixture(scope="module")
def rsna_phantoms(tmp_path_factory) -> Path:
    """Three small RSNA-layout phantom studies (seed 3: one axial series is one stack, two are per-level stacks)."""
    from bundle.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("ml") / "rsna"
    return generate_phantoms(root, "rsna", studies=3, seed=3, min_size=64, max_size=96)


def _series_folders(root: Path, description: str) -> list[Path]:
    listed = read_rsna_series(root / "train_series_descriptions.csv")
    return [root / "train_images" / st / sid for st, rows in listed.items() for sid, d in rows if d == description]


def _served_small(model: str, weights_dir: Path) -> ConfigParser:
    """``model``'s served config with :data:`SMALL` sizes and seeded random weights in ``weights_dir``."""
    parser = read_served_config(ROOT, model)
    for key, value in {**SMALL, "ckpt_dir": str(weights_dir)}.items():
        parser[key] = value
    weights_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def#network").state_dict(), weights_dir / "model.pt")
    return parser


def _serve(parser: ConfigParser, request: dict) -> tuple[dict, dict]:
    """(preprocessed item, answer) as MONAI Label's BundleInferTask runs a request: the served preprocessing's
    transforms one by one, the inferer on the image with a batch axis added and removed, the postprocessing's."""
    keys = served_keys(parser)
    pre, inferer, post = (parser.get_parsed_content(keys[k]) for k in ("preprocessing", "inferer", "postprocessing"))
    network = parser.get_parsed_content("network_def").eval()
    data = dict(request)
    for transform in pre.transforms:
        data = transform(data)
    with torch.no_grad():
        out = {**data, "pred": inferer(data["image"][None], network)[0]}
    for transform in post.transforms:
        out = transform(out)
    return data, out


def _check_label_map(out: dict, planes: int) -> np.ndarray:
    """The answer's label map (rows, cols, planes) fits MONAI Label's Restored as is and holds each keypoint's
    value at its pixel (plane ``block`` for axial keypoints)."""
    label, result = out["pred"], out["result"]
    assert label.dtype == torch.uint8 and label.shape[0] == 1 and label.shape[-1] == planes
    assert list(out["image"].meta["spatial_shape"]) == list(label.shape[1:])
    lab = label[0].numpy()
    assert set(np.unique(lab)) <= {0} | set(result["label_values"].values())
    for p in result["keypoints"]:
        assert p["value"] == result["label_values"][f"{p['stream']}/{p['level']}"]
        assert lab[round(p["y"]), round(p["x"]), p.get("block", 0)] == p["value"]
    json.dumps(result)
    return lab


def test_served_models_and_their_weights():
    assert list(SERVED_MODELS) == ["spineone", "spineone_sagittal_t1", "spineone_axial_t2"]
    weights = {m: served_weights(read_served_config(ROOT, m), ROOT) for m in SERVED_MODELS}
    assert weights == {
        "spineone": "model.pt",
        "spineone_sagittal_t1": os.path.join("sagittal_t1", "model.pt"),
        "spineone_axial_t2": os.path.join("axial_t2", "model.pt"),
    }
    spinal = read_served_config(ROOT, "spineone")
    shipped = ConfigParser.load_config_file(ROOT / "configs" / "inference.json")
    assert {k: v for k, v in spinal.config.items() if k != "_meta_"} == {**shipped, "bundle_root": str(ROOT)}
    assert served_keys(spinal) == {k: k for k in ("preprocessing", "inferer", "postprocessing")}
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        read_served_config(ROOT, "nope")


def test_served_sagittal_t1_labels_a_t1_series(rsna_phantoms, tmp_path):
    parser = _served_small("spineone_sagittal_t1", tmp_path / "w")
    assert served_keys(parser)["preprocessing"] == "preprocessing"
    streams = default_streams("rsna", "sagittal_t1")
    for folder in _series_folders(rsna_phantoms, "Sagittal T1"):
        data, out = _serve(parser, {"image": str(folder)})
        assert tuple(data["image"].shape) == (6, 128, 128)  # left slab, right slab of 3 slices
        series = sort_series(read_slice_headers(list_dicom_files(folder)))
        middle = series.slices[series.middle]
        # no canal points in the request: the canal is the middle slice's centre (documented fallback)
        centre = pixel_to_patient(middle, 0.5 * (middle.cols - 1), 0.5 * (middle.rows - 1))
        assert data["image"].meta["canal_x_mm"] == pytest.approx(centre[0])
        result = out["result"]
        assert result["label_values"] == label_values(streams) and len(result["label_values"]) == 10
        assert 1 <= len(result["keypoints"]) <= 10
        for p in result["keypoints"]:
            assert p["stream"] in streams and p["level"] in LEVELS
            assert p["instance_number"] == middle.instance_number
        lab = _check_label_map(out, planes=1)
        assert lab.shape[:2] == (middle.rows, middle.cols)
        np.testing.assert_allclose(out["image"].meta["original_affine"], out["pred"].affine.numpy())
    # canal points given with the request (e.g. the sagittal T2 model's answer) move both slabs with them
    shifted = [[float(centre[0]) + 6.0, float(centre[1]), float(centre[2])]] * 5
    data, _ = _serve(parser, {"image": str(folder), "canal_mm": shifted})
    assert data["image"].meta["canal_x_mm"] == pytest.approx(centre[0] + 6.0)


def test_axial_blocks_of_one_stack_and_of_per_level_stacks(rsna_phantoms):
    counts = []
    for folder in _series_folders(rsna_phantoms, "Axial T2"):
        headers = read_slice_headers(list_dicom_files(folder))
        blocks = parallel_blocks(headers)
        assert sorted(h.instance_number for b in blocks for h in b) == sorted(h.instance_number for h in headers)
        for block in blocks:  # parallel planes, sorted along their normal
            assert all(abs(float(h.normal @ block[0].normal)) > 0.9999 for h in block)
            offsets = [float(h.position @ block[0].normal) for h in block]
            assert offsets == sorted(offsets)
        points = axial_block_points_mm(folder)
        assert len(points) == len(blocks)
        assert [p[2] for p in points] == sorted((p[2] for p in points), reverse=True)  # cranial first
        counts.append(len(blocks))
    assert sorted(counts) == [1, 5, 5]  # one stack through all levels; per-level stacks, one per disc


def test_served_axial_t2_labels_each_block(rsna_phantoms, tmp_path):
    parser = _served_small("spineone_axial_t2", tmp_path / "w")
    assert served_keys(parser) == {k: f"monailabel_{k}" for k in ("preprocessing", "inferer", "postprocessing")}
    streams = default_streams("rsna", "axial_t2")
    folder = next(f for f in _series_folders(rsna_phantoms, "Axial T2") if len(axial_block_points_mm(f)) == 5)
    data, out = _serve(parser, {"image": str(folder)})
    assert tuple(data["image"].shape) == (5, 3, 128, 128)
    result = out["result"]
    assert result["label_values"] == label_values(streams) and len(result["label_values"]) == 2
    blocks = result["blocks"]
    assert [b["block"] for b in blocks] == list(range(5))
    assert [b["point_mm"] for b in blocks] == axial_block_points_mm(folder)
    assert len({b["instance_number"] for b in blocks}) == 5
    assert 1 <= len(result["keypoints"])
    for p in result["keypoints"]:
        assert p["stream"] in streams and p["instance_number"] == blocks[p["block"]]["instance_number"]
        # position_mm lies on its block's centre slice: RAS affine of that plane, k = 0
        ras = np.asarray(blocks[p["block"]]["affine"])
        index = np.linalg.inv(LPS_TO_RAS @ ras) @ [*p["position_mm"], 1.0]
        np.testing.assert_allclose(index[:3], [p["y"], p["x"], 0.0], atol=1e-3)
    _check_label_map(out, planes=5)
    np.testing.assert_allclose(out["image"].meta["original_affine"][:3, 3], np.asarray(blocks[0]["affine"])[:3, 3])

    # the request's disc points (e.g. the sagittal T2 model's position_mm) replace the block centres
    one = axial_block_points_mm(folder)[2]
    data, out = _serve(parser, {"image": str(folder), "disc_mm": [one]})
    assert tuple(data["image"].shape) == (1, 3, 128, 128)
    assert [b["instance_number"] for b in out["result"]["blocks"]] == [blocks[2]["instance_number"]]
    _check_label_map(out, planes=1)
    with pytest.raises(BundleInputError, match="disc_mm must be a list of"):
        _serve(parser, {"image": str(folder), "disc_mm": [1.0, 2.0]})


# ---------------------------------------------------------------- MONAI Label server (opt-in)

SERVER_WAIT_S = 240  # bounded start-up wait (about 30-60 s on 2 CPU cores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", timeout: float = 120.0, form: dict[str, str] | None = None) -> bytes:
    """GET or POST ``url``; ``form`` fields go as multipart/form-data (how MONAI Label reads ``params``)."""
    data, headers = (b"" if method == "POST" else None), {}
    if form:
        boundary = "spineone-test-boundary"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in form.items()]
        data = ("".join(parts) + f"--{boundary}--\r\n").encode()
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
    req = urllib.request.Request(url, method=method, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.read()


def _python() -> str:
    return os.environ.get("SPINEONE_MONAILABEL_PYTHON", sys.executable)


def _monaibundle_app(root: Path) -> Path:
    """MONAI Label's ``monaibundle`` sample app, copied from the installed package into ``root``."""
    cmd = [_python(), "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle", "--output", str(root)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return root / "monaibundle"


def _package(model_dir: Path, *extra: str, src: Path = ROOT) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "package_bundle.py"), "--src", str(src), "--out", str(model_dir)]
    subprocess.run([*cmd, *extra], check=True, timeout=120)


def _random_weights(path: Path, depth: int) -> None:
    from bundle import SpineOne

    torch.manual_seed(0)
    net = SpineOne(streams(disc=3), backbone_depth=depth, in_channels=7, attention=["pam", "cam"], pam_impl="fused")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def _phantom_studies(tmp_path: Path) -> tuple[Path, Path]:
    """(studies folder, series folder): one phantom sagittal T2 series as the image ``phantom``."""
    from bundle import find_studies
    from bundle.phantoms import generate_phantoms

    phantoms = tmp_path / "phantoms"
    generate_phantoms(phantoms, layout="rsna", studies=1, seed=3, max_size=256)
    series = Path(find_studies(phantoms)[0]["image"][0]).parent
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copytree(series, studies / "phantom.series")  # one sagittal series folder = one image
    return studies, series


def _packaged_app(copy: Path, *extra: str) -> Path:
    """The shipped app of a bundle copy packaged into ``copy`` (it serves that copy)."""
    _package(copy, *extra)
    return copy / "scripts" / "monailabel_app"


class _Server:
    """``monailabel start_server`` on a free port of 127.0.0.1 serving ``models`` (``--conf models``); log in ``log``.

    ``app`` is the shipped app (serving its own bundle copy, as docs/README.md starts it) or, with
    ``monaibundle``, MONAI Label's sample app serving ``app/model/spineone``."""

    def __init__(
        self, app: Path, studies: Path, log: Path, monaibundle: bool = False, models: str = "spineone"
    ) -> None:
        self.base = f"http://127.0.0.1:{_free_port()}"
        self.log_path = log
        env = {**os.environ, "MONAI_LABEL_DATASTORE_FILE_EXT": '["*.series"]'}
        conf = ["models", models]
        if monaibundle:
            env["PYTHONPATH"] = str(app / "model" / "spineone")
            conf += ["zoo_source", "local", "sam2", "false", "skip_trainers", "true"]
        cmd = [_python(), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies)]
        for key, value in zip(conf[::2], conf[1::2]):
            cmd += ["--conf", key, value]
        cmd += ["--host", "127.0.0.1", "--port", self.base.rsplit(":", 1)[1]]
        self._log = open(log, "w")
        self.process = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_info(self) -> dict | None:
        """``/info/`` once the server answers; None when it exited first or did not answer in time."""
        for _ in range(SERVER_WAIT_S):
            if self.process.poll() is not None:
                return None
            try:
                return json.loads(_request(f"{self.base}/info/", timeout=5))
            except OSError:
                time.sleep(1.0)
        return None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=30)
        self._log.close()


@pytest.mark.monailabel
def test_monailabel_server_infers_keypoints(tmp_path):
    import nibabel as nib
    from bundle.io import load_sagittal_series

    model_dir = tmp_path / "spineone"
    app = _packaged_app(model_dir, "--no-weights")
    # small network so that CPU inference takes seconds; random weights (the server loads models/model.pt)
    config_path = model_dir / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config.update({"backbone_depth": 18, "input_size": 128, "pixdim": 2.1875, "device": "$torch.device('cpu')"})
    config_path.write_text(json.dumps(config, indent=4) + "\n")
    _random_weights(model_dir / "models" / "model.pt", depth=18)
    studies, series = _phantom_studies(tmp_path)

    server = _Server(app, studies, tmp_path / "server.log")
    base = server.base
    try:
        info = server.wait_info()
        assert info is not None, server.log()[-4000:]
        assert list(info["models"]) == ["spineone"] and not info["trainers"], (info["models"], info["trainers"])

        # an unknown image id: HTTP 404 naming it and the datastore's images, never a result
        with pytest.raises(urllib.error.HTTPError) as error:
            _request(f"{base}/infer/spineone?image=no_such_study&output=json", "POST")
        assert error.value.code == 404
        detail = json.loads(error.value.read())["detail"]
        assert detail == f"image 'no_such_study' is not in the datastore {studies.resolve()}; its images are: phantom"
        assert not (studies / "labels").exists() or not any((studies / "labels").rglob("no_such_study*"))

        result = json.loads(_request(f"{base}/infer/spineone?image=phantom&output=json", "POST"))
        points = result["keypoints"]
        assert 1 <= len(points) <= 5
        assert result["label_values"] == label_values(STREAMS)
        for p in points:
            assert p["stream"] == "disc" and p["level"] in STREAMS["disc"]["levels"]
            assert p["label"] in STREAMS["disc"]["classes"] and len(p["probabilities"]) == 3
            assert np.all(np.isfinite(p["position_mm"]))

        label_bytes = _request(f"{base}/infer/spineone?image=phantom&output=image", "POST")
        label_file = tmp_path / "label.nii.gz"
        label_file.write_bytes(label_bytes)
        label = nib.load(str(label_file))
        data = np.asarray(label.dataobj)
        meta = load_sagittal_series(series).meta
        rows, cols = (int(v) for v in meta["spatial_shape"])
        assert data.shape == (rows, cols, 1)
        np.testing.assert_allclose(label.affine, LPS_TO_RAS @ np.asarray(meta["original_affine"]), atol=1e-3)
        for p in points:  # same request, same weights: the disks sit on the JSON keypoints
            index = np.linalg.inv(meta["original_affine"]) @ [*p["position_mm"], 1.0]
            np.testing.assert_allclose(index, [p["y"], p["x"], 0.0, 1.0], atol=1e-3)
            assert data[round(p["y"]), round(p["x"]), 0] == p["value"]
        assert set(np.unique(data)) <= {0} | {p["value"] for p in points}

        # result_extension is read from the params form field (as a URL parameter it is ignored)
        nrrd = _request(
            f"{base}/infer/spineone?image=phantom&output=image",
            "POST",
            form={"params": '{"result_extension": ".nrrd"}'},
        )
        assert nrrd.startswith(b"NRRD"), nrrd[:16]
    finally:
        server.stop()


@pytest.mark.monailabel
def test_monailabel_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    model_dir = tmp_path / "spineone"
    app = _packaged_app(model_dir, "--no-weights")  # inference.json as shipped: ResNet-50
    _random_weights(model_dir / "models" / "model.pt", depth=18)  # the demo's ResNet-18 weights
    studies, _ = _phantom_studies(tmp_path)
    server = _Server(app, studies, tmp_path / "server.log")
    try:
        info = server.wait_info()
        assert info is None or "spineone" not in info["models"], "served weights that do not fit"
        log = server.log()
        assert "the weights do not fit the configured network, refusing to serve them" in log, log[-4000:]
        assert "overrides that probably fit these weights: --backbone_depth 18" in log
        line = next(x for x in log.splitlines() if "refusing to serve them" in x)  # one line says it all
        assert "network keys missing from the checkpoint (e.g. backbone.layer1.0.conv3.weight" in line
        assert "shape mismatches (e.g. backbone.layer1.0.conv1.weight (64, 64, 3, 3) in the checkpoint" in line
        assert "--backbone_depth 18" in line and "configs/demo.json" in line
    finally:
        server.stop()


@pytest.mark.monailabel
def test_monailabel_serves_the_packaged_demo_as_it_is(tmp_path):
    """``package_bundle.py --demo`` into MONAI Label's ``monaibundle`` app (the documented alternative), then
    start_server, no edits: the demo's weights (trained ones when models/demo/model.pt exists, else demo-shaped
    random ones in a bundle copy) answer /infer with named levels, all 5 with trained weights; an unknown image
    id gets 404 without its name."""
    src = ROOT
    if not (ROOT / "models" / "demo" / "model.pt").is_file():
        src = tmp_path / "src"
        _package(src, "--no-weights")
        demo = json.loads((ROOT / "configs" / "demo.json").read_text())
        _random_weights(src / "models" / "demo" / "model.pt", depth=demo["backbone_depth"])
    app = _monaibundle_app(tmp_path / "apps")
    _package(app / "model" / "spineone", "--demo", src=src)
    studies, _ = _phantom_studies(tmp_path)
    server = _Server(app, studies, tmp_path / "server.log", monaibundle=True)
    try:
        info = server.wait_info()
        assert info is not None and "spineone" in info["models"], server.log()[-4000:]
        result = json.loads(_request(f"{server.base}/infer/spineone?image=phantom&output=json", "POST"))
        levels = [p["level"] for p in result["keypoints"]]
        assert levels and len(set(levels)) == len(levels) and set(levels) <= set(STREAMS["disc"]["levels"])
        if src == ROOT:  # trained demo weights find every disc; random ones (the level map included) need not
            assert sorted(levels) == STREAMS["disc"]["levels"]
        # the sample app hands the bundle an empty path for an unknown id: the loader's 404, which cannot name it
        with pytest.raises(urllib.error.HTTPError) as error:
            _request(f"{server.base}/infer/spineone?image=no_such_study&output=json", "POST")
        assert error.value.code == 404
        detail = json.loads(error.value.read())["detail"]
        assert "empty series path" in detail and "requested image id is not in its datastore" in detail
        assert not (studies / "labels").exists() or not any((studies / "labels").rglob("no_such_study*"))
    finally:
        server.stop()


def _label_volume(base: str, model: str, image: str, path: Path) -> np.ndarray:
    """The label file of one /infer request (NIfTI) as an array."""
    import nibabel as nib

    path.write_bytes(_request(f"{base}/infer/{model}?image={image}&output=image", "POST"))
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.mark.monailabel
def test_monailabel_server_serves_the_sagittal_t1_and_axial_models(tmp_path, rsna_phantoms):
    """The shipped app with ``--conf models all`` (small random networks): a T1 and an axial series get
    keypoints of their streams and a label map; the axial one per block, or at the request's disc point."""
    model_dir = tmp_path / "spineone"
    app = _packaged_app(model_dir, "--no-weights")
    config_path = model_dir / "configs" / "inference.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **SMALL}, indent=4) + "\n")
    for model in SERVED_MODELS:  # random weights where each served config's ckpt_dir puts them
        parser = read_served_config(model_dir, model)
        weights = model_dir / "models" / served_weights(parser, model_dir)
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content("network_def#network").state_dict(), weights)
    studies = tmp_path / "studies"
    studies.mkdir()
    t1 = _series_folders(rsna_phantoms, "Sagittal T1")[0]
    axial = next(f for f in _series_folders(rsna_phantoms, "Axial T2") if len(axial_block_points_mm(f)) == 5)
    shutil.copytree(t1, studies / "t1.series")
    shutil.copytree(axial, studies / "axial.series")

    server = _Server(app, studies, tmp_path / "server.log", models="all")
    base = server.base
    try:
        info = server.wait_info()
        assert info is not None, server.log()[-4000:]
        assert list(info["models"]) == list(SERVED_MODELS), info["models"]

        t1_streams = default_streams("rsna", "sagittal_t1")
        result = json.loads(_request(f"{base}/infer/spineone_sagittal_t1?image=t1&output=json", "POST"))
        assert result["label_values"] == label_values(t1_streams)
        assert 1 <= len(result["keypoints"]) <= 10
        assert all(p["stream"] in t1_streams and p["level"] in LEVELS for p in result["keypoints"])
        middle = sort_series(read_slice_headers(list_dicom_files(t1)))
        middle = middle.slices[middle.middle]
        data = _label_volume(base, "spineone_sagittal_t1", "t1", tmp_path / "t1.nii.gz")
        assert data.shape == (middle.rows, middle.cols, 1)
        assert set(np.unique(data)) <= {0} | {p["value"] for p in result["keypoints"]}

        ax_streams = default_streams("rsna", "axial_t2")
        result = json.loads(_request(f"{base}/infer/spineone_axial_t2?image=axial&output=json", "POST"))
        assert result["label_values"] == label_values(ax_streams)
        np.testing.assert_allclose([b["point_mm"] for b in result["blocks"]], axial_block_points_mm(axial), atol=1e-6)
        assert result["keypoints"] and all(0 <= p["block"] < 5 for p in result["keypoints"])
        data = _label_volume(base, "spineone_axial_t2", "axial", tmp_path / "axial.nii.gz")
        assert data.shape[2] == 5 and set(np.unique(data)) <= {0, 1, 2}
        for p in result["keypoints"]:
            assert data[round(p["y"]), round(p["x"]), p["block"]] == p["value"]

        point = axial_block_points_mm(axial)[3]  # a disc point given with the request (params form field)
        form = {"params": json.dumps({"disc_mm": [point]})}
        result = json.loads(_request(f"{base}/infer/spineone_axial_t2?image=axial&output=json", "POST", form=form))
        np.testing.assert_allclose([b["point_mm"] for b in result["blocks"]], [point], atol=1e-6)
    finally:
        server.stop()


def test_label_disks_equal_the_whole_grid_test():
    """Each disk is drawn on its bounding box only: the same map as testing every pixel of the grid, for
    anisotropic spacing, overlapping disks (the later wins), points at and beyond the borders."""
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1] = [0.0, 0.0, -0.7], [0.0, 0.45, 0.0]  # mm per row, per column
    points = [
        {"x": 10.3, "y": 12.8, "value": 1},
        {"x": 14.0, "y": 15.5, "value": 2},  # overlaps the first
        {"x": -2.0, "y": 0.4, "value": 3},  # centre left of the image, its disk reaches in
        {"x": 39.6, "y": 29.9, "value": 4},  # bottom-right corner
        {"x": 80.0, "y": 90.0, "value": 5},  # far outside: nothing drawn
    ]
    rows, cols, disk = 30, 40, 3.0
    got = KeypointsToLabeld("pred", RSNA_STREAMS, disk_mm=disk)._draw(points, rows, cols, affine)
    ii, jj = np.mgrid[0:rows, 0:cols]
    expected = np.zeros((rows, cols), dtype=np.uint8)
    for p in points:
        expected[((ii - p["y"]) * 0.7) ** 2 + ((jj - p["x"]) * 0.45) ** 2 <= disk**2] = p["value"]
    assert np.array_equal(got, expected) and set(np.unique(got)) == {0, 1, 2, 3, 4}
