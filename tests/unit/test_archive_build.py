"""archive.sh writes an archive atomically: torch-model-archiver packs into a private directory, the archive's
members are checked, and only a complete archive is renamed over OUT/NAME.mar; a failed build leaves an existing
archive byte for byte as it was, and two builds of one name at once both give a complete archive."""
import subprocess
import sys
import zipfile

import pytest

from torchserve_harness import REPO
from vision_attribution.archives.build import BuildError, check_members

GOOD_ARCHIVE = b"PK\x05\x06" + bytes(18)  # an empty zip: stands for the good archive a failed build must not touch


def effnet_build(out) -> subprocess.Popen:
    return subprocess.Popen([str(REPO / "archive.sh"), "effnet", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_check_members_refuses_a_truncated_archive_and_a_missing_member(tmp_path):
    handler, weights = tmp_path / "attribution_handler.py", tmp_path / "weights.pt"
    handler.write_text("# handler\n")
    weights.write_bytes(bytes(4096))
    archive = tmp_path / "lanet.mar"
    with zipfile.ZipFile(archive, "w") as mar:
        mar.writestr("MAR-INF/MANIFEST.json", "{}")
        mar.write(weights, "weights.pt")
    with pytest.raises(BuildError, match="without a complete attribution_handler.py"):
        check_members(archive, [handler, weights])
    with zipfile.ZipFile(archive, "a") as mar:
        mar.write(handler, "attribution_handler.py")
    check_members(archive, [handler, weights])
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(BuildError, match="unreadable lanet.mar"):
        check_members(archive, [handler, weights])


@pytest.mark.slow
def test_a_failed_build_leaves_the_existing_archive_and_no_staging(tmp_path):
    (tmp_path / "effnet.mar").write_bytes(GOOD_ARCHIVE)
    build = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "vision_attribution.archives.build", "effnet", "--out", str(tmp_path),
                            "--handler", str(tmp_path / "no_such_handler.py"), "--configs", str(REPO / "vision_attribution/archives/configs")],
                           capture_output=True, text=True)  # fmt: skip
    assert build.returncode == 2 and "torch-model-archiver failed" in build.stderr, build.stderr
    assert (tmp_path / "effnet.mar").read_bytes() == GOOD_ARCHIVE
    assert sorted(path.name for path in tmp_path.iterdir()) == ["effnet.mar"]


@pytest.mark.slow
def test_two_builds_of_one_name_at_once_both_give_a_complete_archive(tmp_path):
    builds = [effnet_build(tmp_path), effnet_build(tmp_path)]
    outputs = [build.communicate() for build in builds]
    assert [build.returncode for build in builds] == [0, 0], outputs
    assert sorted(path.name for path in tmp_path.iterdir()) == ["effnet.mar"]
    with zipfile.ZipFile(tmp_path / "effnet.mar") as mar:
        assert mar.testzip() is None
        assert {"MAR-INF/MANIFEST.json", "weights.pt", "attribution_handler.py", "effnet.yaml"} <= set(mar.namelist()), mar.namelist()


def test_the_command_line_of_one_archive_reads_only_that_archives_module():
    """Every build read every archive's settings, importing tensormask's network (torchvision's detection ops, torch's
    compiler: about 3.5 s of each build); a build reads its own archive's, and every archive's only for --help or an
    option its archive lacks (whose message names the archive's own settings)."""
    code = (
        "import sys; from vision_attribution.archives.build import parse_arguments\n"
        "args = parse_arguments(['--handler', 'h', '--configs', 'c', 'lanet', '--checkpoint', 'top1.pt', '--idg-grid', '4'])\n"
        "assert args.archive == 'lanet' and args.setting_idg_grid == '4', args\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('vision_attribution.archives.'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert loaded == ["vision_attribution.archives.build", "vision_attribution.archives.lanet"]
    done = subprocess.run([str(REPO / "archive.sh"), "lanet", "--checkpoint", "top1.pt", "--model-type", "full"], capture_output=True, text=True)
    assert done.returncode == 2 and "lanet has no setting --model-type; its settings are: --idg-grid" in done.stderr
