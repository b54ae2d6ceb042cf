"""`ckptmap demo` (what `make demo` runs) keeps working: it checks its own results and exits 0 only
when every MindSpore tensor matches and the way back is md5-identical."""

from ckptmap.cli import main


def test_demo_runs_clean(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "demo ok" in out and out.count("identical") == 8 and "MISMATCH" not in out
