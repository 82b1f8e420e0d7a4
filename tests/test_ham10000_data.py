"""HAM10000 data: demo writer, validation, datalist, lesion-grouped splits, class balance, transforms, real archive."""

from __future__ import annotations

import csv
import json
import logging
import pickle
import re
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctan_monai.apps.ham10000.demo import write_ham10000_demo
from ctan_monai.apps.ham10000.sampling import class_count_table, class_counts, class_weights, weighted_sampler
from ctan_monai.apps.ham10000.splits import check_no_lesion_leak, load_split, prepare_splits, split_by_lesion
from ctan_monai.apps.ham10000.transforms import (
    AddPresenceFlagsd,
    eval_transforms,
    inference_transforms,
    train_transforms,
)
from ctan_monai.apps.ham10000.validation import HAM10000_CLASSES, build_datalist, find_dataset_dir, validate_dataset
from ctan_monai.data.validation import DatasetValidationError

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]  # the order the package must use
COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]  # the real CSV's columns
MASKS = "HAM10000_segmentations_lesion_tschandl"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def read_rows(dataset_dir: Path) -> list[dict[str, str]]:
    with open(dataset_dir / "HAM10000_metadata.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(dataset_dir: Path, rows: list[dict[str, str]]) -> None:
    with open(dataset_dir / "HAM10000_metadata.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def image_path(dataset_dir: Path, image_id: str) -> Path:
    (found,) = dataset_dir.glob(f"HAM10000_images*/{image_id}.jpg")
    return found


def mask_path(dataset_dir: Path, image_id: str) -> Path:
    return dataset_dir / MASKS / f"{image_id}_segmentation.png"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ham10000_demo(tmp_path_factory.mktemp("ham") / "HAM10000", n_images=70, seed=0)


@pytest.fixture(scope="module")
def demo_datalist(demo_root: Path) -> list[dict]:
    return build_datalist(demo_root)


@pytest.fixture
def demo_copy(demo_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo_root, tmp_path / "HAM10000"))


# ------------------------------------------------------------------------------------------------ demo writer


def test_demo_layout(demo_root: Path) -> None:
    rows = read_rows(demo_root)
    assert list(rows[0]) == COLUMNS
    assert len(rows) == 70
    assert {r["dx"] for r in rows} == set(CLASSES)
    assert max(Counter(r["lesion_id"] for r in rows).values()) >= 2  # some lesions have several images
    assert len({r["image_id"] for r in rows}) == 70
    folders = {image_path(demo_root, r["image_id"]).parent.name for r in rows}
    assert folders == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    for row in rows:
        with Image.open(image_path(demo_root, row["image_id"])) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (200, 150))
        with Image.open(mask_path(demo_root, row["image_id"])) as mask:
            values = np.unique(np.asarray(mask))
            assert mask.size == (600, 450) and values.tolist() == [0, 255]
    assert "SYNTHETIC" in (demo_root / "README.txt").read_text()


def test_demo_is_deterministic(tmp_path: Path) -> None:
    a = write_ham10000_demo(tmp_path / "a", n_images=9, seed=3)
    b = write_ham10000_demo(tmp_path / "b", n_images=9, seed=3)
    c = write_ham10000_demo(tmp_path / "c", n_images=9, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "HAM10000_metadata.csv").read_bytes() != (c / "HAM10000_metadata.csv").read_bytes()
    with pytest.raises(ValueError, match="at least 7"):
        write_ham10000_demo(tmp_path / "d", n_images=6)


def test_demo_lesions_depend_on_class(demo_root: Path) -> None:
    """Lesion area and colour separate the classes: a nearest-centroid rule on them is far above chance."""
    features, labels = [], []
    for row in read_rows(demo_root):
        rgb = np.asarray(Image.open(image_path(demo_root, row["image_id"])), dtype=float) / 255
        mask = np.asarray(Image.open(mask_path(demo_root, row["image_id"])).resize((200, 150), Image.NEAREST)) > 0
        features.append([mask.mean(), *rgb[mask].mean(axis=0), *rgb[mask].std(axis=0)])
        labels.append(CLASSES.index(row["dx"]))
    x, y = np.array(features), np.array(labels)
    x = (x - x.mean(0)) / x.std(0)
    correct = 0
    for i in range(len(y)):  # leave-one-out nearest centroid
        keep = np.arange(len(y)) != i
        centroids = np.stack([x[keep & (y == c)].mean(0) for c in range(7)])
        correct += int(np.argmin(((centroids - x[i]) ** 2).sum(1)) == y[i])
    assert correct / len(y) > 0.8  # chance is about 0.3 (the largest class)
    area = {c: np.mean([f[0] for f, label in zip(features, labels) if label == c]) for c in range(7)}
    grey = {c: np.mean([np.mean(f[1:4]) for f, label in zip(features, labels) if label == c]) for c in range(7)}
    assert area[CLASSES.index("mel")] > 2 * area[CLASSES.index("df")]
    assert grey[CLASSES.index("mel")] < grey[CLASSES.index("nv")] < grey[CLASSES.index("bkl")]


# ------------------------------------------------------------------------------------------------ datalist


def test_build_datalist_matches_metadata(demo_root: Path, demo_datalist: list[dict]) -> None:
    assert list(HAM10000_CLASSES) == CLASSES
    rows = read_rows(demo_root)
    assert [e["image_id"] for e in demo_datalist] == [r["image_id"] for r in rows]
    for entry, row in zip(demo_datalist, rows):
        assert set(entry) == {"image", "seg", "dx", "image_id", "lesion_id"}
        assert entry["dx"] == CLASSES.index(row["dx"]) and entry["lesion_id"] == row["lesion_id"]
        assert Path(entry["image"]) == image_path(demo_root, row["image_id"])
        assert Path(entry["seg"]) == mask_path(demo_root, row["image_id"])
    # The parent folder of the dataset is accepted too (as in an extracted archive).
    assert find_dataset_dir(demo_root.parent) == demo_root
    assert len(build_datalist(demo_root.parent, validate=False)) == 70


def test_find_dataset_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no HAM10000_metadata.csv"):
        find_dataset_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        find_dataset_dir(tmp_path / "nowhere")


def test_validate_clean_demo(demo_root: Path) -> None:
    report = validate_dataset(demo_root, deep=True)
    assert report.ok, report.problems
    assert report.valid_cases == [r["image_id"] for r in read_rows(demo_root)]


# ------------------------------------------------------------------------------------------------ validation


def _truncate_image(root: Path, rows: list[dict[str, str]], i: int) -> tuple[Path, str]:
    path = image_path(root, rows[i]["image_id"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    return path, "truncated"


def _garbage_image(root: Path, rows: list[dict[str, str]], i: int) -> tuple[Path, str]:
    path = image_path(root, rows[i]["image_id"])
    path.write_bytes(b"this is not a JPEG" * 10)
    return path, "cannot be read"


def _delete_image(root: Path, rows: list[dict[str, str]], i: int) -> tuple[Path, str]:
    path = image_path(root, rows[i]["image_id"])
    path.unlink()
    return path, "image listed in the metadata CSV but not found"


def _delete_mask(root: Path, rows: list[dict[str, str]], i: int) -> tuple[Path, str]:
    path = mask_path(root, rows[i]["image_id"])
    path.unlink()
    return path, "lesion mask not found"


def _grey_mask(root: Path, rows: list[dict[str, str]], i: int) -> tuple[Path, str]:
    path = mask_path(root, rows[i]["image_id"])
    mask = np.asarray(Image.open(path)).copy()
    mask[mask > 0] = 128
    mask[:10, :10] = 255
    Image.fromarray(mask).save(path)
    return path, "not binary: grey values [0, 128, 255]"


def _square_mask(root: Path, rows: list[dict[str, str]], i: int) -> tuple[Path, str]:
    path = mask_path(root, rows[i]["image_id"])
    Image.open(path).resize((450, 450), Image.NEAREST).save(path)
    return path, "has another aspect ratio than its image"


def _unknown_dx(root: Path, rows: list[dict[str, str]], i: int) -> tuple[Path, str]:
    rows[i]["dx"] = "melanoma"
    return root / "HAM10000_metadata.csv", "unknown dx 'melanoma'"


def _duplicate_id(root: Path, rows: list[dict[str, str]], i: int) -> tuple[Path, str]:
    rows.append(dict(rows[i]))
    return root / "HAM10000_metadata.csv", "duplicate image_id"


def _two_diagnoses(root: Path, rows: list[dict[str, str]], i: int) -> tuple[Path, str]:
    rows[i]["lesion_id"] = rows[0]["lesion_id"]  # rows[0] is another class (the CSV is sorted by class)
    return root / "HAM10000_metadata.csv", "has several diagnoses"


CORRUPTIONS = {
    "truncated_jpeg": _truncate_image,
    "unreadable_image": _garbage_image,
    "missing_image": _delete_image,
    "missing_mask": _delete_mask,
    "mask_not_binary": _grey_mask,
    "mask_aspect": _square_mask,
    "unknown_dx": _unknown_dx,
    "duplicate_image_id": _duplicate_id,
    "lesion_two_dx": _two_diagnoses,
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_reported_with_its_file(demo_copy: Path, name: str) -> None:
    rows = read_rows(demo_copy)
    case = rows[-3]["image_id"]
    file, message = CORRUPTIONS[name](demo_copy, rows, len(rows) - 3)
    write_rows(demo_copy, rows)
    report = validate_dataset(demo_copy)
    mine = [p for p in report.problems if p.case == case]
    assert mine, report.problems
    assert all(str(file) in p.file and message in p.message for p in mine), mine
    assert len(report.valid_cases) == len({r["image_id"] for r in rows}) - len(report.bad_cases())
    with pytest.raises(DatasetValidationError) as err:
        build_datalist(demo_copy)
    assert str(file) in str(err.value) and message in str(err.value)


def test_all_problems_reported_at_once_and_skippable(demo_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = read_rows(demo_copy)
    corrupted = {}
    for k, corrupt in enumerate(CORRUPTIONS.values()):
        i = 5 + 7 * k  # one case per corruption, spread over the classes
        corrupted[rows[i]["image_id"]] = corrupt(demo_copy, rows, i)
    write_rows(demo_copy, rows)
    report = validate_dataset(demo_copy)
    # A lesion with two diagnoses also flags the images of the other diagnosis (here rows[0]'s lesion).
    lesion0 = {r["image_id"] for r in rows if r["lesion_id"] == rows[0]["lesion_id"]}
    assert set(report.bad_cases()) == set(corrupted) | lesion0
    for image_id, (file, message) in corrupted.items():
        assert any(p.case == image_id and str(file) in p.file and message in p.message for p in report.problems)
    with pytest.raises(DatasetValidationError) as err:
        build_datalist(demo_copy)
    assert len(err.value.problems) == len(report.problems)
    with caplog.at_level(logging.WARNING, logger="ctan_monai.apps.ham10000"):
        kept = build_datalist(demo_copy, skip_bad=True)
    assert {e["image_id"] for e in kept} == {r["image_id"] for r in rows} - set(corrupted) - lesion0
    assert f"skipping {len(set(corrupted) | lesion0)} of {len(rows)} case(s)" in caplog.text


def test_structural_problems_always_raise(demo_copy: Path) -> None:
    """Problems that belong to no case cannot be skipped."""
    rows = read_rows(demo_copy)
    write_rows(demo_copy, [{k: v for k, v in row.items() if k != "dx"} for row in rows])
    with pytest.raises(DatasetValidationError, match=r"lacks column\(s\) \['dx'\]"):
        build_datalist(demo_copy, skip_bad=True)
    write_rows(demo_copy, rows)
    shutil.rmtree(demo_copy / MASKS)
    with pytest.raises(DatasetValidationError, match="mask folder not found") as err:
        build_datalist(demo_copy, skip_bad=True)
    assert [p.file for p in err.value.problems] == [str(demo_copy / MASKS)]


def test_palette_masks_are_read_through_their_palette(demo_copy: Path) -> None:
    """Like 315 masks of the real archive: a "P" PNG whose palette maps index 0 to white (the lesion)."""
    rows = read_rows(demo_copy)
    path = mask_path(demo_copy, rows[0]["image_id"])
    lesion = np.asarray(Image.open(path)) > 0
    indices = np.where(lesion, 0, 255).astype(np.uint8)
    palette_mask = Image.fromarray(indices)
    palette_mask.putpalette([v for i in range(256) for v in (255 - i,) * 3])  # "L" becomes "P", indices kept
    palette_mask.save(path)
    with Image.open(path) as saved:
        assert saved.mode == "P" and np.array_equal(np.asarray(saved), indices)
    # Also a 0/1 mask (another common convention) for the second case.
    path1 = mask_path(demo_copy, rows[1]["image_id"])
    lesion1 = np.asarray(Image.open(path1)) > 0
    Image.fromarray(lesion1.astype(np.uint8)).save(path1)
    assert validate_dataset(demo_copy).ok
    transform = eval_transforms((450, 600))  # the masks' own grid: nearest resampling is the identity
    datalist = build_datalist(demo_copy)
    np.testing.assert_array_equal(transform(datalist[0])["seg"][0].numpy(), lesion)
    np.testing.assert_array_equal(transform(datalist[1])["seg"][0].numpy(), lesion1)


# ------------------------------------------------------------------------------------------------ splits


def test_split_by_lesion_is_grouped_stratified_and_complete(demo_datalist: list[dict]) -> None:
    splits = split_by_lesion(demo_datalist, (0.7, 0.15, 0.15), seed=0)
    assert list(splits) == ["training", "validation", "test"]
    ids = [e["image_id"] for entries in splits.values() for e in entries]
    assert sorted(ids) == sorted(e["image_id"] for e in demo_datalist)  # each image exactly once
    lesion_sets = [{e["lesion_id"] for e in entries} for entries in splits.values()]
    assert all(not (a & b) for i, a in enumerate(lesion_sets) for b in lesion_sets[i + 1 :])
    lesions_of_class = defaultdict(set)
    for e in demo_datalist:
        lesions_of_class[e["dx"]].add(e["lesion_id"])
    for dx, lesions in lesions_of_class.items():
        for fraction, lesion_set in zip((0.7, 0.15, 0.15), lesion_sets):
            assert abs(len(lesions & lesion_set) - fraction * len(lesions)) < 1, (dx, fraction)
    # Reproducible, independent of the datalist's order, and the seed matters.
    shuffled = [demo_datalist[i] for i in np.random.default_rng(1).permutation(len(demo_datalist))]
    assert split_by_lesion(shuffled, seed=0) == splits
    assert split_by_lesion(demo_datalist, seed=1) != splits


def test_split_argument_errors(demo_datalist: list[dict]) -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_lesion(demo_datalist, (0.7, 0.2, 0.2))
    with pytest.raises(ValueError, match="one distinct split name"):
        split_by_lesion(demo_datalist, (0.5, 0.5), names=("a", "b", "c"))
    with pytest.raises(ValueError, match="two diagnoses"):
        split_by_lesion([{"image_id": "a", "lesion_id": "L", "dx": 1}, {"image_id": "b", "lesion_id": "L", "dx": 2}])
    with pytest.raises(ValueError, match="1 lesion"):
        check_no_lesion_leak({"training": [{"lesion_id": "L"}], "test": [{"lesion_id": "L"}]})


def test_split_file_round_trip(demo_root: Path, demo_datalist: list[dict], tmp_path: Path) -> None:
    split_file = tmp_path / "splits.json"
    splits = split_by_lesion(demo_datalist, seed=0, split_file=split_file)
    document = json.loads(split_file.read_text())
    assert document["seed"] == 0 and document["dataset_dir"] == str(demo_root)
    assert document["fractions"] == {"training": 0.7, "validation": 0.15, "test": 0.15}
    assert document["class_counts"]["test"] == class_counts(splits["test"])
    assert not Path(document["training"][0]["image"]).is_absolute()  # portable: relative to dataset_dir
    assert load_split(split_file) == splits
    assert load_split(split_file, "validation") == splits["validation"]
    # The dataset moved: the same file resolves against the new place.
    moved = Path(shutil.copytree(demo_root, tmp_path / "moved"))
    assert load_split(split_file, "test", dataset_dir=moved)[0]["image"].startswith(str(moved))
    with pytest.raises(KeyError, match="no split 'train'"):
        load_split(split_file, "train")
    Path(splits["test"][0]["seg"]).rename(tmp_path / "away.png")
    try:
        with pytest.raises(DatasetValidationError, match=splits["test"][0]["image_id"]):
            load_split(split_file)
    finally:
        (tmp_path / "away.png").rename(splits["test"][0]["seg"])
    document["test"].append(document["training"][0])
    split_file.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="more than one split"):
        load_split(split_file)


def test_prepare_splits_writes_once_then_reuses(demo_root: Path, tmp_path: Path) -> None:
    split_file = tmp_path / "run" / "splits.json"
    training = prepare_splits(demo_root, split_file, seed=2, split="training")
    stamp = split_file.stat().st_mtime_ns
    assert prepare_splits(demo_root, split_file, seed=2, split="training") == training
    assert split_file.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="existing split was made with seed=2"):
        prepare_splits(demo_root, split_file, seed=3)


# ------------------------------------------------------------------------------------------------ class balance


def test_class_counts_and_table(demo_datalist: list[dict]) -> None:
    assert class_counts([{"dx": 5}, {"dx": 5}, {"dx": 0}]) == dict(zip(CLASSES, [1, 0, 0, 0, 0, 2, 0]))
    expected = Counter(CLASSES[e["dx"]] for e in demo_datalist)
    assert class_counts(demo_datalist) == {c: expected[c] for c in CLASSES}
    table = class_count_table({"training": demo_datalist}).splitlines()
    nv_row = next(line for line in table if line.startswith("nv "))
    assert nv_row.split()[1:] == [str(expected["nv"]), f"({100 * expected['nv'] / 70:.1f}%)"]
    assert table[-2].split() == ["images", "70"]


def test_class_weights() -> None:
    np.testing.assert_allclose(class_weights([10, 30]).numpy(), [2.0, 2 / 3], rtol=1e-6)
    sqrt = np.array([10**-0.5, 30**-0.5])
    np.testing.assert_allclose(
        class_weights([10, 30], "inverse_sqrt").numpy(), sqrt * 40 / (sqrt @ [10, 30]), rtol=1e-6
    )
    np.testing.assert_allclose(class_weights({"a": 10, "b": 0, "c": 30}, "none").numpy(), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(class_weights([10, 0, 30]).numpy(), [2.0, 0.0, 2 / 3], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown class balancing"):
        class_weights([1, 2], "focal")
    with pytest.raises(ValueError, match="at least one sample"):
        class_weights([0, 0])


def test_weighted_sampler_balances_and_switches_off() -> None:
    datalist = [{"dx": 5}] * 90 + [{"dx": 4}] * 10
    sampler = weighted_sampler(datalist, num_samples=4000, seed=0)
    drawn = [datalist[i]["dx"] for i in sampler]
    assert abs(drawn.count(4) / 4000 - 0.5) < 0.03  # 10% of the data, half of the draws
    assert list(weighted_sampler(datalist, num_samples=50, seed=0)) == list(
        weighted_sampler(datalist, num_samples=50, seed=0)
    )
    assert weighted_sampler(datalist, method="none") is None


# ------------------------------------------------------------------------------------------------ transforms


def test_eval_transforms_values(demo_datalist: list[dict]) -> None:
    entry = demo_datalist[3]
    out = eval_transforms((150, 200))(entry)  # the image's own grid: only the mask is resampled
    rgb = np.asarray(Image.open(entry["image"]).convert("RGB"), dtype=np.float64) / 255
    expected = ((rgb - MEAN) / STD).transpose(2, 0, 1)
    assert out["image"].dtype == torch.float32 and tuple(out["image"].shape) == (3, 150, 200)
    np.testing.assert_allclose(out["image"].numpy(), expected, atol=1e-5)
    assert out["seg"].dtype == torch.int64 and tuple(out["seg"].shape) == (1, 150, 200)
    small = np.asarray(Image.open(entry["seg"]).resize((200, 150), Image.NEAREST)) > 0
    assert (out["seg"][0].numpy() == small).mean() > 0.99
    assert out["dx"].dtype == torch.int64 and int(out["dx"]) == entry["dx"]
    assert float(out["seg_present"]) == 1.0 and float(out["dx_present"]) == 1.0
    square = eval_transforms()(entry)
    assert tuple(square["image"].shape) == (3, 224, 224) and tuple(square["seg"].shape) == (1, 224, 224)
    assert set(square["seg"].unique().tolist()) == {0, 1}
    assert float(eval_transforms()({**entry, "dx_present": 0.0})["dx_present"]) == 0.0  # a datalist flag is kept
    assert float(AddPresenceFlagsd(["seg", "dx"])({"dx": 1})["seg_present"]) == 0.0  # no label, no flag
    image_only = inference_transforms()({"image": entry["image"]})
    assert set(image_only) == {"image"}
    torch.testing.assert_close(image_only["image"].as_tensor(), square["image"].as_tensor())
    with pytest.raises(ValueError, match="size must be"):
        eval_transforms((0, 10))
    pickle.dumps(train_transforms())  # DataLoader workers receive the pipeline pickled


def _disc_case(tmp_path: Path) -> dict:
    """A white image with a black disc, and the disc's mask at 3x the resolution."""
    yy, xx = np.mgrid[0:450, 0:600]
    disc = (xx - 380) ** 2 + (yy - 200) ** 2 < 90**2
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "disc_segmentation.png")
    rgb = np.repeat(np.where(disc, 20, 235).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(rgb).resize((200, 150), Image.BILINEAR).save(tmp_path / "disc.jpg", quality=95)
    return {"image": str(tmp_path / "disc.jpg"), "seg": str(tmp_path / "disc_segmentation.png"), "dx": 1}


def test_train_transforms_move_image_and_mask_together(tmp_path: Path) -> None:
    case = _disc_case(tmp_path)
    reference = eval_transforms(96)(case)
    changed = 0
    for seed in range(6):
        out = train_transforms(96).set_random_state(seed=seed)(case)
        again = train_transforms(96).set_random_state(seed=seed)(case)
        torch.testing.assert_close(out["image"], again["image"])  # reproducible from the seed
        brightness = (out["image"].numpy() * STD[:, None, None] + MEAN[:, None, None]).mean(0)
        dark = brightness < 0.5
        assert (dark == (out["seg"][0].numpy() == 1)).mean() > 0.97, seed
        changed += int(not torch.equal(out["seg"], reference["seg"]))
        assert out["image"].shape == reference["image"].shape and out["seg"].dtype == torch.int64
    assert changed >= 3  # the augmentation does move things
    # Everything off: training transforms reduce to the evaluation ones.
    plain = train_transforms(96, flip_prob=0, affine_prob=0, color_prob=0).set_random_state(seed=0)(case)
    torch.testing.assert_close(plain["image"], reference["image"])
    assert torch.equal(plain["seg"], reference["seg"])
    wide = train_transforms((96, 128)).set_random_state(seed=1)(case)  # non-square: no 90-degree turns
    assert tuple(wide["image"].shape) == (3, 96, 128) and tuple(wide["seg"].shape) == (1, 96, 128)


def test_dataloader_batches(demo_datalist: list[dict]) -> None:
    from monai.data import DataLoader, Dataset

    datalist = demo_datalist[:4]
    loader = DataLoader(
        Dataset(datalist, train_transforms(64)), batch_size=4, sampler=weighted_sampler(datalist, seed=0)
    )
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (4, 3, 64, 64) and tuple(batch["seg"].shape) == (4, 1, 64, 64)
    assert batch["dx"].dtype == torch.int64 and tuple(batch["dx"].shape) == (4,)
    assert batch["dx_present"].tolist() == [1.0] * 4


# ------------------------------------------------------------------------------------------------ real archive


@pytest.fixture(scope="module")
def real_dir(ham10000_root: Path) -> Path:
    return find_dataset_dir(ham10000_root)


@pytest.mark.realdata
def test_real_archive_all_entries_valid_and_fast(real_dir: Path) -> None:
    rows = read_rows(real_dir)
    start = time.perf_counter()
    report = validate_dataset(real_dir)
    seconds = time.perf_counter() - start
    print(f"\nvalidate_dataset on {len(rows)} real cases: {seconds:.1f} s")
    assert report.ok, report.problems[:10]
    assert len(rows) == 8024 and report.valid_cases == [r["image_id"] for r in rows]
    assert seconds < 60


@pytest.mark.realdata
def test_real_archive_datalist_and_splits(real_dir: Path, tmp_path: Path) -> None:
    rows = read_rows(real_dir)
    datalist = build_datalist(real_dir, validate=False)
    assert len(datalist) == 8024
    expected = Counter(r["dx"] for r in rows)
    assert class_counts(datalist) == {c: expected[c] for c in CLASSES}
    splits = split_by_lesion(datalist, seed=0, split_file=tmp_path / "splits.json")
    split_of_lesion = defaultdict(set)
    for name, entries in splits.items():
        for entry in entries:
            split_of_lesion[entry["lesion_id"]].add(name)
    assert all(len(names) == 1 for names in split_of_lesion.values())  # no lesion in two splits
    assert len(split_of_lesion) == len({r["lesion_id"] for r in rows})
    assert sum(len(v) for v in splits.values()) == 8024
    for name, fraction in (("training", 0.7), ("validation", 0.15), ("test", 0.15)):
        assert abs(len(splits[name]) / 8024 - fraction) < 0.02
    table = class_count_table(splits)
    print("\nHAM10000 real subset, split by lesion (seed 0):\n" + table)
    # the reported counts: every class in every split, summing to the split sizes, as recorded in the split file
    cells = {line.split()[0]: re.findall(r"(\d+) \(\s*[\d.]+%\)", line) for line in table.splitlines()[1:8]}
    images = table.splitlines()[8].split()
    recorded = json.loads((tmp_path / "splits.json").read_text())["class_counts"]
    for column, name in enumerate(("training", "validation", "test")):
        reported = {c: int(cells[c][column]) for c in CLASSES}
        assert reported == recorded[name] == class_counts(splits[name])
        assert images[0] == "images" and sum(reported.values()) == int(images[1 + column]) == len(splits[name])
        assert all(reported[c] > 0 for c in CLASSES), (name, reported)  # stratified: every class in every split
    assert load_split(tmp_path / "splits.json") == splits
    sample = train_transforms().set_random_state(seed=0)(splits["training"][0])
    assert tuple(sample["image"].shape) == (3, 224, 224) and set(sample["seg"].unique().tolist()) <= {0, 1}


@pytest.mark.realdata
def test_real_palette_masks_keep_the_lesion_foreground(real_dir: Path) -> None:
    palette_ids = []
    for path in sorted((real_dir / MASKS).iterdir()):
        with Image.open(path) as im:
            if im.mode == "P":
                palette_ids.append(path.name.removesuffix("_segmentation.png"))
        if len(palette_ids) == 3:
            break
    assert palette_ids, "the real archive has palette masks"
    datalist = {e["image_id"]: e for e in build_datalist(real_dir, validate=False)}
    transform = eval_transforms((450, 600))
    for image_id in palette_ids:
        im = Image.open(mask_path(real_dir, image_id))
        indices = np.asarray(im)
        grey = np.asarray(im.getpalette()[0::3])[indices]  # the palette's red = grey for a grey palette
        loaded = transform(datalist[image_id])["seg"][0].numpy()
        np.testing.assert_array_equal(loaded, grey > 127)
        assert (loaded != (indices > 127)).mean() > 0.99  # raw indices would swap lesion and skin


@pytest.mark.realdata
def test_real_corrupted_copies_name_the_file(real_dir: Path, tmp_path: Path) -> None:
    rows = read_rows(real_dir)[:6]
    copy = tmp_path / "HAM10000"
    (copy / "HAM10000_images").mkdir(parents=True)
    (copy / MASKS).mkdir()
    for row in rows:
        shutil.copy(image_path(real_dir, row["image_id"]), copy / "HAM10000_images")
        shutil.copy(mask_path(real_dir, row["image_id"]), copy / MASKS)
    write_rows(copy, rows)
    assert validate_dataset(copy).ok
    truncated, _ = _truncate_image(copy, rows, 1)
    missing, _ = _delete_mask(copy, rows, 2)
    rows[4]["dx"] = "naevus"
    write_rows(copy, rows)
    report = validate_dataset(copy)
    assert {(p.case, Path(p.file)) for p in report.problems} == {
        (rows[4]["image_id"], copy / "HAM10000_metadata.csv"),
        (rows[2]["image_id"], missing),
        (rows[1]["image_id"], truncated),
    }
    with pytest.raises(DatasetValidationError) as err:
        build_datalist(copy)
    text = str(err.value)
    assert "3 problem(s)" in text and str(truncated) in text and str(missing) in text and "'naevus'" in text
    print("\n" + text)
