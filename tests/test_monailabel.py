"""MONAI Label postprocessing (default run) and a real MONAI Label 0.8.5 server (opt-in, marker ``monailabel``).

The server test runs the server with ``SPINEONE_MONAILABEL_PYTHON`` (default: this interpreter), which must
have requirements-monailabel.txt installed:
    SPINEONE_MONAILABEL=1 SPINEONE_MONAILABEL_PYTHON=/path/to/mlenv/bin/python \
        python -m pytest -q tests/test_monailabel.py
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle.decoding import decode_keypoints
from bundle.monailabel import KeypointsToLabeld, label_values
from bundle.streams import split_output
from monai.data import MetaTensor

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
    """Network output (9, grid, grid): heatmap logits +20 on 3x3 blocks centred at (row, col) for class c,
    -1e4 (p = 0) elsewhere, zero offsets."""
    out = torch.zeros(9, grid, grid)
    out[:3] = -1e4
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
    post = KeypointsToLabeld("pred", STREAMS, radius=2.0, disk_mm=3.0)
    expected = decode_keypoints(
        split_output(pred.clone()[None], {"disc": 3}),
        STREAMS,
        radius=2.0,
        upsample=4.0,
        affine=torch.as_tensor(pre_affine)[None],
    )[0]["disc"]
    out = post({"image": image, "pred": pred})
    points = out["result"]["keypoints"]
    assert len(points) == len(expected) >= 2
    assert [p["level"] for p in points] == [e["level"] for e in expected]
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
    for p, value in zip(points, range(1, 6)):
        assert p["value"] == value == label_values(STREAMS)[f"disc/{p['level']}"]
        assert lab[round(p["y"]), round(p["x"])] == value
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
        post({"image": torch.zeros(7, 8, 8), "pred": torch.zeros(9, 2, 2)})
    image = MetaTensor(torch.zeros(7, 8, 8), meta={"original_affine": np.eye(4), "spatial_shape": np.array([8, 8])})
    with pytest.raises(ValueError, match="without batch"):
        post({"image": image, "pred": torch.zeros(1, 9, 2, 2)})


# ---------------------------------------------------------------- MONAI Label server (opt-in)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", timeout: float = 120.0) -> bytes:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.read()


@pytest.mark.monailabel
def test_monailabel_server_infers_keypoints(tmp_path):
    import nibabel as nib
    from bundle import SpineOne, find_studies
    from bundle.phantoms import generate_phantoms

    python = os.environ.get("SPINEONE_MONAILABEL_PYTHON", sys.executable)
    app = tmp_path / "apps" / "monaibundle"
    subprocess.run(
        [
            python,
            "-m",
            "monailabel.main",
            "apps",
            "--download",
            "--name",
            "monaibundle",
            "--output",
            str(tmp_path / "apps"),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    model_dir = app / "model" / "spineone"
    packager = [sys.executable, str(ROOT / "scripts" / "package_bundle.py"), "--out", str(model_dir)]
    subprocess.run(packager, check=True, timeout=60)
    # small network so that CPU inference takes seconds; random weights (the server loads models/model.pt)
    config_path = model_dir / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config.update({"backbone_depth": 18, "input_size": 128, "pixdim": 2.1875, "device": "$torch.device('cpu')"})
    config_path.write_text(json.dumps(config, indent=4))
    torch.manual_seed(0)
    net = SpineOne({"disc": 3}, backbone_depth=18, in_channels=7, attention=["pam", "cam"], pam_impl="fused")
    torch.save(net.state_dict(), model_dir / "models" / "model.pt")

    phantoms = tmp_path / "phantoms"
    generate_phantoms(phantoms, layout="rsna", studies=1, seed=3, max_size=256)
    series = Path(find_studies(phantoms)[0]["image"][0]).parent
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copytree(series, studies / "phantom.series")  # one sagittal series folder = one image

    port = _free_port()
    env = {**os.environ, "MONAI_LABEL_DATASTORE_FILE_EXT": '["*.series"]', "PYTHONPATH": str(model_dir)}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            python,
            "-m",
            "monailabel.main",
            "start_server",
            "--app",
            str(app),
            "--studies",
            str(studies),
            "--conf",
            "models",
            "spineone",
            "--conf",
            "zoo_source",
            "local",
            "--conf",
            "sam2",
            "false",
            "--conf",
            "skip_trainers",
            "true",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        info = None
        for _ in range(240):  # bounded: at most about 4 minutes
            if server.poll() is not None:
                break
            try:
                info = json.loads(_request(f"{base}/info/", timeout=5))
                break
            except OSError:
                time.sleep(1.0)
        assert info is not None, (tmp_path / "server.log").read_text()[-4000:]
        assert "spineone" in info["models"], info["models"].keys()

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
        from bundle.io import load_sagittal_series

        meta = load_sagittal_series(series).meta
        rows, cols = (int(v) for v in meta["spatial_shape"])
        assert data.shape == (rows, cols, 1)
        np.testing.assert_allclose(label.affine, LPS_TO_RAS @ np.asarray(meta["original_affine"]), atol=1e-3)
        for p in points:  # same request, same weights: the disks sit on the JSON keypoints
            index = np.linalg.inv(meta["original_affine"]) @ [*p["position_mm"], 1.0]
            np.testing.assert_allclose(index, [p["y"], p["x"], 0.0, 1.0], atol=1e-3)
            assert data[round(p["y"]), round(p["x"]), 0] == p["value"]
        assert set(np.unique(data)) <= {0} | {p["value"] for p in points}
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        log.close()
