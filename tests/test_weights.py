"""`vfx-ray weights put` and --pretrained-path URIs, on a stand-in state dict (no real ImageNet
weights can be downloaded here): a random resnet18 saved under torchvision-style names."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision

from vfx_ray import storage
from vfx_ray.cli import main
from vfx_ray.ml import model as vmodel


@pytest.fixture(autouse=True)
def _one_line_errors(monkeypatch):
    monkeypatch.delenv("VFX_RAY_DEBUG", raising=False)


def stand_in(
    folder: Path, name: str | None = None, *, wrong_hash: bool = False, arch: str = "resnet18"
) -> tuple[Path, dict]:
    """A random ``arch`` state dict saved as ``name``, or as torchvision names it: arch-<sha256[:8]>.pth."""
    torch.manual_seed(7)
    state = torchvision.models.get_model(arch, weights=None).state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    prefix = digest[:8]
    if wrong_hash:  # a prefix that is certainly not the real one
        prefix = ("0" if prefix[0] != "0" else "1") + prefix[1:]
    path = folder / (name or f"{arch}-{prefix}.pth")
    tmp.rename(path)
    return path, state


def put(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["weights", "put", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_hashed_file_to_a_local_folder(tmp_path, capsys):
    src, _ = stand_in(tmp_path / "src")
    rc, out, err = put(capsys, "--arch", "resnet18", "--from", str(src), "--to", f"{tmp_path / 'dest'}/")
    dest = tmp_path / "dest" / src.name
    assert rc == 0 and out == f"--pretrained-path {dest}\n"
    assert dest.read_bytes() == src.read_bytes()
    assert "matches the name" in err and err.count("\n") == 1


@pytest.mark.slow
def test_to_s3_then_training_builds_from_it(objectstore_server, tmp_path, capsys):
    src, state = stand_in(tmp_path)
    rc, out, _ = put(capsys, "--arch", "resnet18", "--from", str(src), "--to", "s3://test/weights/")
    uri = f"s3://test/weights/{src.name}"
    assert rc == 0 and out.split() == ["--pretrained-path", uri]
    assert storage.read_bytes(uri) == src.read_bytes()
    net = vmodel.build_model("resnet18", "imagenet", pretrained_path=uri)
    assert torch.equal(net.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])
    assert net.fc.out_features == 1


def test_plain_name_is_copied_to_the_exact_uri_unchecked(objectstore_server, tmp_path, capsys):
    src, _ = stand_in(tmp_path, "my_weights.pth")
    rc, out, err = put(capsys, "--arch", "resnet18", "--from", str(src), "--to", "s3://test/w/plain.pth")
    assert rc == 0 and out == "--pretrained-path s3://test/w/plain.pth\n" and "matches" not in err
    assert storage.read_bytes("s3://test/w/plain.pth") == src.read_bytes()


def test_wrong_hash_prefix_is_refused(objectstore_server, tmp_path, capsys):
    src, _ = stand_in(tmp_path, wrong_hash=True)
    rc, out, err = put(capsys, "--arch", "resnet18", "--from", str(src), "--to", "s3://test/bad/")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "SHA-256" in err and src.name.split("-")[1][:8] in err
    assert not storage.exists(f"s3://test/bad/{src.name}")


def test_a_hashed_destination_name_must_match_too(tmp_path, capsys):
    src, _ = stand_in(tmp_path, "plain.pth")
    rc, _, err = put(capsys, "--arch", "resnet18", "--from", str(src), "--to", str(tmp_path / "resnet18-00000000.pth"))
    assert rc == 2 and "SHA-256" in err and not (tmp_path / "resnet18-00000000.pth").exists()


@pytest.mark.parametrize("arch", ["resnet50", "resnet34"])
def test_weights_of_another_arch_are_refused(tmp_path, capsys, arch):
    src, _ = stand_in(tmp_path)  # resnet18 weights, correctly named
    rc, out, err = put(capsys, "--arch", arch, "--from", str(src), "--to", f"{tmp_path / 'dest'}/")
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert f"does not fit {arch}" in err and not (tmp_path / "dest").exists()


def test_not_a_weights_file_is_refused(tmp_path, capsys):
    bad = tmp_path / "notes.pth"
    bad.write_bytes(b"not a pickle at all\n" * 10)
    rc, _, err = put(capsys, "--arch", "resnet18", "--from", str(bad), "--to", f"{tmp_path / 'dest'}/")
    assert rc == 2 and err.count("\n") == 1 and "not a PyTorch weights file" in err


def test_default_source_is_the_torchvision_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    rc, _, err = put(capsys, "--arch", "resnet18", "--to", f"{tmp_path / 'dest'}/")
    assert rc == 2 and "torchvision cache" in err and "--from" in err and err.count("\n") == 1
    # a stand-in under torchvision's own name: found in the cache, and its hash is checked
    cache = Path(vmodel.imagenet_weight_files("resnet18")[0])
    stand_in(cache.parent, cache.name)
    rc, _, err = put(capsys, "--arch", "resnet18", "--to", f"{tmp_path / 'dest'}/")
    assert rc == 2 and str(cache) in err and "SHA-256" in err


def test_missing_pretrained_uri_is_one_clear_line(objectstore_server):
    for uri in ("s3://test/missing.pth", "s3://test/weights-folder/"):
        with pytest.raises(vmodel.PretrainedWeightsError) as e:
            vmodel.find_imagenet_weights("resnet18", uri)
        msg = str(e.value)
        assert uri in msg and "not found" in msg and "\n" not in msg
        assert "weights put" in msg and "--pretrained none" in msg
    storage.write_bytes("s3://test/weights-folder/x.pth", b"x")  # a prefix with objects is no file
    with pytest.raises(vmodel.PretrainedWeightsError):
        vmodel.find_imagenet_weights("resnet18", "s3://test/weights-folder")


def test_help_names_the_command_and_its_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["weights", "put", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines by terminal width
    assert e.value.code == 0
    for needle in ("--arch", "--to", "--from", "SHA-256", "--pretrained-path", "torchvision cache"):
        assert needle in out, needle


def test_cli_arch_choices_follow_the_model():
    from vfx_ray.cli import weights as cli_weights

    assert cli_weights.ARCHS == vmodel.ARCHS  # kept apart only so that --help needs no torch


def test_unreadable_pretrained_uri_is_one_line(monkeypatch):
    def denied(uri):
        raise OSError("When getting information for key 'w.pth': AWS Error ACCESS_DENIED\nmore detail")

    monkeypatch.setattr(vmodel, "file_exists", denied)
    with pytest.raises(vmodel.PretrainedWeightsError, match="ACCESS_DENIED") as e:
        vmodel.find_imagenet_weights("resnet18", "s3://test/w.pth")
    assert "\n" not in str(e.value) and "--pretrained-path s3://test/w.pth" in str(e.value)
