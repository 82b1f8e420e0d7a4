"""The real MONAI Label server (monailabel 0.8.5) with ``monailabel_app/`` and all four bundles, over HTTP on
127.0.0.1: ``/info``; ``/infer`` for OpenKBP and prostate CTs stored in two orientations (affine = the input's, label
map = the standalone bundle's, Dice >= 0.99 per class), prostate from a DICOM series, HAM10000 from PNG and JPEG,
STOIC probabilities; the dose / diagnosis in the response; bad inputs answered with HTTP 422.

Tiny data (synthetic demo cases, OpenKBP on a 64^3 grid, HAM10000 at 64 px) and random-init resnet18 weights
(seed 0) keep it lean: what is tested is the plumbing (geometry, orientation, formats, outputs), which does not
depend on how well a model learnt. Skipped when monailabel is not installed (the ``monailabel`` extra, see the
README section "Use in MONAI Label").
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if importlib.util.find_spec("monailabel") is None:
    pytest.skip(
        "monailabel is not installed: pip install -e '.[monailabel]' && pip install --no-deps monailabel==0.8.5 "
        "pydicom-seg==0.4.1 (README: Use in MONAI Label)",
        allow_module_level=True,
    )

import nibabel as nib  # noqa: E402
import requests  # noqa: E402
import SimpleITK as sitk  # noqa: E402, N813
import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from PIL import Image  # noqa: E402
from requests_toolbelt.multipart.decoder import MultipartDecoder  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("ctan_openkbp", "ctan_prostate", "ctan_ham10000", "ctan_stoic")
HAM_SIZE = 64  # the test copy's HAM10000 image_size
OPENKBP_GRID = 64
TRAIN_SLICES = 16  # slices per training epoch in the test copies of the CT bundles
STARTUP_S = 300
REQUEST_S = 600


# ---------------------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    total = int(x.sum() + y.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(x, y).sum()) / total


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI's array and affine in the closest canonical (RAS) orientation: a common frame to compare in."""
    image = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(image.dataobj), image.affine


def _write_reoriented(source: Path, target: Path, axcodes: str) -> None:
    """Store the NIfTI ``source`` in the orientation ``axcodes`` (same voxels, another array order and affine)."""
    image = nib.load(str(source))
    ornt = nib.orientations.ornt_transform(nib.io_orientation(image.affine), nib.orientations.axcodes2ornt(axcodes))
    data = nib.orientations.apply_orientation(np.asarray(image.dataobj), ornt)
    affine = image.affine @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(target))
    assert nib.aff2axcodes(affine) == tuple(axcodes)


def _infer(base: str, model: str, file: Path | None = None, image: str | None = None) -> tuple[dict, bytes | None]:
    """POST /infer/<model> (output=all); return the result JSON and the label file's bytes (None if absent)."""
    params = {"output": "all"}
    if image is not None:
        params["image"] = image
    files = {"file": (file.name, file.read_bytes())} if file is not None else None
    reply = requests.post(f"{base}/infer/{model}", params=params, files=files, data={"params": "{}"}, timeout=REQUEST_S)
    assert reply.status_code == 200, f"{model} {file or image}: HTTP {reply.status_code}: {reply.text[:2000]}"
    if not reply.headers.get("content-type", "").startswith("multipart"):
        return reply.json(), None
    result, label = {}, None
    for part in MultipartDecoder.from_response(reply).parts:
        disposition = part.headers.get(b"Content-Disposition", b"").decode()
        if 'name="params"' in disposition:
            result = json.loads(part.content)
        elif 'name="image"' in disposition:
            label = part.content
    return result, label


def _save(content: bytes, path: Path) -> Path:
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("monailabel")


@pytest.fixture(scope="module")
def bundles(work: Path) -> Path:
    """A copy of the four bundles' configs with random-init resnet18 weights (seed 0) as models/model.pt; HAM10000
    infers at 64 px and the CT bundles' epochs draw 16 slices."""
    root = work / "bundles"
    for name in BUNDLES:
        shutil.copytree(REPO / "bundles" / name / "configs", root / name / "configs")
        (root / name / "models").mkdir()
    ham = root / "ctan_ham10000" / "configs" / "inference.yaml"
    text, found = re.subn(r"(?m)^image_size: \d+", f"image_size: {HAM_SIZE}", ham.read_text(), count=1)
    assert found == 1, f"{ham}: no top-level image_size"
    ham.write_text(text)
    for name in ("ctan_openkbp", "ctan_prostate"):  # a short epoch: the test checks the plumbing, not the learning
        train = root / name / "configs" / "train.yaml"
        text, found = re.subn(
            r"(?m)^train_slices_per_epoch: \d+", f"train_slices_per_epoch: {TRAIN_SLICES}", train.read_text()
        )
        assert found == 1, f"{train}: no top-level train_slices_per_epoch"
        train.write_text(text)
    for name in BUNDLES:
        parser = ConfigParser()
        parser.read_config(str(root / name / "configs" / "inference.yaml"))
        parser["bundle_root"] = str(root / name)
        torch.manual_seed(0)
        network = parser.get_parsed_content("network_def")
        torch.save(network.state_dict(), root / name / "models" / "model.pt")
    return root


def _write_label_pair(folder: Path, name: str, image: sitk.Image, label: sitk.Image) -> None:
    """One labelled datastore image: ``folder/name`` and ``folder/labels/final/name``."""
    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / name))
    label.CopyInformation(image)
    sitk.WriteImage(label, str(folder / "labels" / "final" / name))


@pytest.fixture(scope="module")
def studies(work: Path) -> Path:
    """The datastore: one labelled OpenKBP CT (grey values, stored RAS), one labelled prostate CT (HU) and one
    labelled HAM10000 image (JPEG, mask PNG 0/255)."""
    from ctan_monai.apps.openkbp.demo import synthetic_openkbp_patient
    from ctan_monai.apps.openkbp.reader import label_map_from_structures, openkbp_affine
    from ctan_monai.apps.prostate.demo import write_prostate_demo

    folder = work / "studies"
    folder.mkdir()
    patient = synthetic_openkbp_patient("pt_2", np.random.default_rng(1), size=OPENKBP_GRID)
    names = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid"]
    labels, _ = label_map_from_structures(patient.structures, names, patient.ct.shape)
    affine = openkbp_affine(patient.voxel_size_mm, patient.ct.shape)
    for array, name in ((patient.ct.astype(np.float32), "ct"), (labels.astype(np.uint8), "label")):
        nib.save(nib.Nifti1Image(array, affine), str(work / f"okbp_{name}_pli.nii.gz"))
        _write_reoriented(work / f"okbp_{name}_pli.nii.gz", work / f"okbp_{name}_ras.nii.gz", "RAS")
    _write_label_pair(
        folder,
        "okbp_1.nii.gz",
        sitk.ReadImage(str(work / "okbp_ct_ras.nii.gz")),
        sitk.Cast(sitk.ReadImage(str(work / "okbp_label_ras.nii.gz")), sitk.sitkUInt8),
    )
    (synthetic,) = write_prostate_demo(work / "prostate_train", n_patients=1, seed=3, shape=(48, 40, 24))
    ct = sitk.GetImageFromArray(synthetic.ct.astype(np.float32))
    ct.SetOrigin(tuple(float(v) for v in synthetic.origin))
    ct.SetSpacing(tuple(float(v) for v in synthetic.spacing))
    label = np.zeros(synthetic.ct.shape, dtype=np.uint8)
    for k, organ in enumerate(["Rectum", "Bladder", "Femur_L", "Femur_R"], start=1):
        label[synthetic.masks[organ]] = k
    _write_label_pair(folder, "pros_1.nii.gz", ct, sitk.GetImageFromArray(label))
    from ctan_monai.apps.ham10000.demo import write_ham10000_demo

    ham = write_ham10000_demo(work / "ham_train", n_images=7)
    image = sorted(ham.rglob("ISIC_*.jpg"))[0]
    shutil.copy(image, folder / "ham_1.jpg")
    shutil.copy(next(ham.rglob(f"{image.stem}_segmentation.png")), folder / "labels" / "final" / "ham_1.png")
    return folder


@pytest.fixture(scope="module")
def server(work: Path, bundles: Path, studies: Path) -> Iterator[str]:
    """The real MONAI Label server with monailabel_app and the four bundles, on 127.0.0.1."""
    port = _free_port()
    log = (work / "server.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    command = [sys.executable, str(REPO / "monailabel_app" / "start_server.py"), "--studies", str(studies)]
    command += ["--port", str(port), "--conf", "bundles_dir", str(bundles)]
    for name, prefix in (("ctan_openkbp", "okbp"), ("ctan_prostate", "pros"), ("ctan_ham10000", "ham")):
        command += ["--conf", f"{name}_images", f"{prefix}_*"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{(work / 'server.log').read_text()[-4000:]}")
            try:
                if requests.get(f"{base}/info/", timeout=10).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /info within {STARTUP_S} s:\n{(work / 'server.log').read_text()[-4000:]}")
            time.sleep(2)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _calibrate_seg_head(bundle: Path, image: str) -> None:
    """Centre the random-init segmentation head's logits on ``image`` (head bias minus each class's mean logit), so
    that the predicted label map varies in space (a constant one would not show a wrong orientation)."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(bundle)
    weights = bundle / "models" / "model.pt"
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    network.eval()
    data = parser.get_parsed_content("pre_transforms")({"image": image})
    with torch.no_grad():
        logits = parser.get_parsed_content("inferer")(data["image"][None], network)["seg"]
        network.decoders["seg"].head.bias.sub_(logits.float().mean(dim=(0, 2, 3, 4)))
    torch.save(network.state_dict(), weights)


def _standalone(bundles: Path, name: str, out: Path, **overrides: Any) -> Path:
    """Run the bundle's standalone inference (``configs/inference.yaml``, ``run``) in this process."""
    from monai.bundle import run

    root = bundles / name
    run(
        "run",
        config_file=str(root / "configs" / "inference.yaml"),
        bundle_root=str(root),
        output_dir=str(out),
        device="cpu",
        **overrides,
    )
    return out


@pytest.fixture(scope="module")
def openkbp_case(work: Path, bundles: Path) -> dict[str, Path]:
    """A synthetic OpenKBP CT (grey values) on a 64^3 grid as NIfTI in the cache's PLI order and as RAS, and the
    standalone bundle's label map for it."""
    from ctan_monai.apps.openkbp.demo import synthetic_openkbp_patient
    from ctan_monai.apps.openkbp.reader import openkbp_affine

    folder = work / "openkbp"
    folder.mkdir()
    patient = synthetic_openkbp_patient("pt_1", np.random.default_rng(0), size=OPENKBP_GRID)
    affine = openkbp_affine(patient.voxel_size_mm, patient.ct.shape)
    pli = folder / "ct_pli.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(patient.ct, dtype=np.float32), affine), str(pli))
    ras = folder / "ct_ras.nii.gz"
    _write_reoriented(pli, ras, "RAS")
    _calibrate_seg_head(bundles / "ctan_openkbp", str(pli))
    out = _standalone(bundles, "ctan_openkbp", folder / "standalone", datalist=[{"image": str(pli), "case_id": "pt_1"}])
    return {"pli": pli, "ras": ras, "standalone": out / "pt_1" / "seg.nii.gz"}


@pytest.fixture(scope="module")
def prostate_case(work: Path, bundles: Path) -> dict[str, Path]:
    """A synthetic prostate DICOM-RT patient (CT series + RTSTRUCT + RTDOSE), its CT as NIfTI in two orientations,
    and the standalone bundle's label map."""
    from ctan_monai.apps.prostate.demo import write_prostate_demo
    from ctan_monai.apps.prostate.inference import find_ct_series
    from ctan_monai.data.dicom_rt import read_ct_series

    folder = work / "prostate"
    dicom = folder / "dicom"
    write_prostate_demo(dicom, n_patients=1, shape=(48, 40, 24), spacing=(6.0, 6.0, 4.0))
    (item,) = find_ct_series(dicom)
    stored = folder / "ct_stored.nii.gz"
    sitk.WriteImage(read_ct_series(item["image"]), str(stored))
    las = folder / "ct_las.nii.gz"
    _write_reoriented(stored, las, "LAS")
    _calibrate_seg_head(bundles / "ctan_prostate", str(dicom))
    out = _standalone(bundles, "ctan_prostate", folder / "standalone", input_dir=str(dicom))
    return {"dicom": dicom, "stored": stored, "las": las, "standalone": out / item["case_id"] / "seg.nii.gz"}


# ---------------------------------------------------------------------------------------------------- tests


def test_info_lists_every_bundle_with_its_labels(server: str) -> None:
    info = requests.get(f"{server}/info/", timeout=60).json()
    models = info["models"]
    assert set(BUNDLES) <= set(models)
    assert models["ctan_openkbp"]["labels"] == {"Brainstem": 1, "SpinalCord": 2, "RightParotid": 3, "LeftParotid": 4}
    assert models["ctan_prostate"]["labels"] == {"Rectum": 1, "Bladder": 2, "Femur_L": 3, "Femur_R": 4}
    assert models["ctan_openkbp"]["dimension"] == models["ctan_prostate"]["dimension"] == 3
    assert "dose" in models["ctan_openkbp"]["outputs"]
    assert models["ctan_ham10000"]["labels"] == {"lesion": 1}
    assert models["ctan_ham10000"]["outputs"]["dx"]["channels"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert models["ctan_stoic"]["type"] == "classification"
    assert models["ctan_stoic"]["labels"] == {"probCOVID": 0, "probSevere": 1}


def _check_ct_label(
    label: bytes | None, source: Path, standalone: Path, out: Path, num_labels: int = 4
) -> tuple[np.ndarray, dict[int, float]]:
    """The label file's affine and shape are the input's; its content is the standalone's (Dice per class)."""
    assert label is not None, f"{source.name}: no label file in the response"
    path = _save(label, out)
    got, wanted = nib.load(str(path)), nib.load(str(source))
    assert got.shape == wanted.shape, f"{source.name}: label {got.shape} vs input {wanted.shape}"
    np.testing.assert_allclose(got.affine, wanted.affine, atol=1e-3, err_msg=f"{source.name}: affine")
    assert nib.aff2axcodes(got.affine) == nib.aff2axcodes(wanted.affine)
    ours, _ = _canonical(path)
    theirs, _ = _canonical(standalone)
    assert ours.shape == theirs.shape
    dice = {k: _dice(ours, theirs, k) for k in range(1, num_labels + 1)}
    assert min(dice.values()) >= 0.99, f"{source.name}: Dice per class vs standalone {dice}"
    return ours, dice


def _check_dose(result: dict, names: list[str]) -> None:
    dose = result["dose"]
    assert dose["unit"] == "Gy" and set(dose["structures"]) == set(names)
    assert all(s["volume_cc"] >= 0 for s in dose["structures"].values())
    assert any("mean" in s for s in dose["structures"].values()), dose


def test_openkbp_two_orientations(server: str, openkbp_case: dict[str, Path], work: Path) -> None:
    names = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid"]
    labels = []
    for key in ("pli", "ras"):
        result, label = _infer(server, "ctan_openkbp", file=openkbp_case[key])
        ours, _ = _check_ct_label(label, openkbp_case[key], openkbp_case["standalone"], work / f"okbp_{key}.nii.gz")
        _check_dose(result, names)
        labels.append(ours)
    assert len(np.unique(labels[0])) >= 2, "the prediction is constant: the orientation check would prove nothing"


def test_prostate_dicom_series_and_two_orientations(server: str, prostate_case: dict[str, Path], work: Path) -> None:
    names = ["Rectum", "Bladder", "Femur_L", "Femur_R"]
    result, label = _infer(server, "ctan_prostate", image=str(prostate_case["dicom"]))
    ours, _ = _check_ct_label(
        label, prostate_case["standalone"], prostate_case["standalone"], work / "pro_dicom.nii.gz"
    )
    _check_dose(result, names)
    assert len(np.unique(ours)) >= 2, "the prediction is constant: the orientation check would prove nothing"
    for key in ("stored", "las"):
        result, label = _infer(server, "ctan_prostate", file=prostate_case[key])
        _check_ct_label(label, prostate_case[key], prostate_case["standalone"], work / f"pro_{key}.nii.gz")
        _check_dose(result, names)


def test_ham10000_png_and_jpeg(server: str, work: Path) -> None:
    from ctan_monai.apps.ham10000.demo import write_ham10000_demo

    data = write_ham10000_demo(work / "ham", n_images=7)
    jpeg = sorted(data.rglob("ISIC_*.jpg"))[0]
    png = work / "ham_input.png"
    with Image.open(jpeg) as image:
        size = image.size
        image.crop((0, 0, size[0] - 7, size[1])).save(png)  # another, non-square size
    for source in (jpeg, png):
        with Image.open(source) as image:
            wanted = image.size
        result, label = _infer(server, "ctan_ham10000", file=source)
        assert label is not None
        with Image.open(io.BytesIO(label)) as mask:
            assert mask.format == "PNG" and mask.size == wanted, (source.name, mask.format, mask.size, wanted)
            values = np.asarray(mask)
        assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1}
        probs = result["diagnosis"]["probabilities"]
        assert list(probs) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
        assert abs(sum(probs.values()) - 1.0) < 1e-4
        assert result["diagnosis"]["predicted_class"] == max(probs, key=probs.get)


def test_stoic_probabilities_match_standalone(server: str, bundles: Path, work: Path) -> None:
    from ctan_monai.apps.stoic.demo import write_stoic_demo

    data = write_stoic_demo(work / "stoic", n_patients=3)
    ct = sorted((data / "data" / "mha").glob("*.mha"))[0]
    result, label = _infer(server, "ctan_stoic", file=ct)
    assert label is None
    out = _standalone(bundles, "ctan_stoic", work / "stoic_standalone", input_dir=str(ct))
    standalone = json.loads((out / f"{ct.name.split('.')[0]}.json").read_text())
    for name in ("probCOVID", "probSevere"):
        assert 0.0 <= result[name] <= 1.0
        assert abs(result[name] - standalone[name]) < 1e-4, (name, result[name], standalone[name])
    assert [p["label"] for p in result["prediction"]] == ["probCOVID", "probSevere"]


def test_bad_inputs_get_http_422(server: str, work: Path) -> None:
    empty = work / "empty.nii.gz"
    empty.write_bytes(b"")
    rgb = work / "rgb.png"
    Image.fromarray(np.full((20, 30, 3), 128, dtype=np.uint8)).save(rgb)
    flat = work / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 30), dtype=np.float32), np.eye(4)), str(flat))
    cases = [
        ("ctan_openkbp", rgb, "channels"),
        ("ctan_prostate", rgb, "channels"),
        ("ctan_openkbp", flat, "2D"),
        ("ctan_prostate", flat, "2D"),
        ("ctan_stoic", flat, "2D"),
        *((model, empty, "empty") for model in BUNDLES),
    ]
    for model, file, words in cases:
        reply = requests.post(
            f"{server}/infer/{model}",
            params={"output": "json"},
            files={"file": (file.name, file.read_bytes())},
            data={"params": "{}"},
            timeout=REQUEST_S,
        )
        assert reply.status_code == 422, (model, file.name, reply.status_code, reply.text[:500])
        detail = reply.json()["detail"]
        assert words in detail and model in detail and "Traceback" not in detail, (model, file.name, detail)


def _wait_for_training(base: str, timeout: float = REQUEST_S) -> dict:
    """Poll /train/ until the latest training task has ended; return its status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{base}/train/", timeout=60).json()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            return status
        time.sleep(2)
    pytest.fail(f"training still running after {timeout} s")


@pytest.mark.parametrize("model", ["ctan_openkbp", "ctan_prostate", "ctan_ham10000"])
def test_train_one_epoch_twice_in_a_row(server: str, bundles: Path, model: str) -> None:
    weights = bundles / model / "models" / "model.pt"
    for attempt in (1, 2):
        before = weights.stat().st_mtime_ns
        reply = requests.post(f"{server}/train/{model}", json={"max_epochs": 1}, timeout=60)
        assert reply.status_code == 200, (model, attempt, reply.text[:1000])
        status = _wait_for_training(server)
        details = "\n".join(status.get("details", []))
        assert status.get("status") == "DONE", f"{model} request {attempt}: {status.get('status')}\n{details}"
        assert weights.stat().st_mtime_ns > before, f"{model} request {attempt}: models/model.pt not rewritten"
        torch.load(weights, map_location="cpu", weights_only=True)  # a readable state dict
