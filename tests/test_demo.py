"""`ckptmap demo` (what `make demo` runs) keeps working: it checks its own results and exits 0 only
when every MindSpore tensor matches and the way back is md5-identical."""

from ckptmap.cli import main


def test_demo_runs_clean(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "demo ok" in out and out.count("identical") == 8 and "MISMATCH" not in out


def test_demo_runs_clean_in_a_fresh_process(tmp_path):
    """`make demo`'s own process: the demo builds its Megatron args and converts in one fresh interpreter, so
    argparse.Namespace's shared key table holds the demo's own attribute strings when ms2pt copies the args
    (a copy filled through that table re-pickled top-level keys apart from the args' and every
    model_optim_rng.pt came back different — a pytest worker's earlier Namespaces hid it)."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "ckptmap", "demo", "--workdir", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "demo ok" in done.stdout and done.stdout.count("identical") == 8 and "DIFFERENT" not in done.stdout
