"""spectra/, the post-processing scripts and `nanosil spectrum | compare | sum` (the command modules behind the
scripts, reached through `python -m al_manager.cli`) work without the ML stack: torch is never imported."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_spectra_modules_and_scripts_do_not_import_torch(tmp_path):
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys, runpy
        import numpy as np
        import spectra
        names = [m.name for m in pkgutil.iter_modules(spectra.__path__)]
        assert {{"io", "autocorrelation", "harmonic", "broadening", "compare", "sums", "plotting"}} <= set(names), names
        for name in names:
            importlib.import_module("spectra." + name)
        from spectra.io import write_dipoles_npz
        from spectra.broadening import broaden
        from spectra.spectrum import write_spectrum_csv
        from spectra.plotting import plot_spectra
        tmp = {str(tmp_path)!r}
        t = np.arange(30000) * 0.5
        write_dipoles_npz(tmp + "/d.npz", np.column_stack([np.cos(0.1 * t), np.sin(0.07 * t), 0 * t]))
        write_spectrum_csv(tmp + "/h.csv", broaden([500.0], [10.0], np.linspace(0, 2000, 501), normalization="area"))
        for script, args in [
            ("ir_spectrum.py", ["d.npz", "--timestep", "0.5", "--temperature", "300", "--out", "s.csv", "--plot", "s.png"]),
            ("compare_spectra.py", ["s.csv", "h.csv", "--plot", "c.png"]),
            ("sum_spectra.py", ["s.csv", "h.csv", "--masses", "100", "200", "--out", "sum.txt", "--plot", "sum.png"]),
        ]:
            sys.argv = [script] + [a if a.startswith("-") or a[0].isdigit() else tmp + "/" + a for a in args]
            try:
                runpy.run_path({str(ROOT / "scripts")!r} + "/" + script, run_name="__main__")
            except SystemExit as exc:
                assert exc.code in (0, None), (script, exc.code)
        assert "torch" not in sys.modules, "torch was imported by the scripts"
        # the installed subcommands, as `python -m al_manager.cli COMMAND ...` runs them
        for command, args in [
            ("spectrum", ["d.npz", "--timestep", "0.5", "--temperature", "300", "--out", "n.csv", "--plot", "n.png"]),
            ("compare", ["n.csv", "h.csv", "--json", "nc.json", "--plot", "nc.png"]),
            ("sum", ["n.csv", "h.csv", "--masses", "100", "200", "--out", "nsum.txt", "--plot", "nsum.png"]),
        ]:
            sys.argv = ["al_manager.cli", command] + [a if a.startswith("-") or a[0].isdigit() else tmp + "/" + a
                                                      for a in args]
            try:
                runpy.run_module("al_manager.cli", run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                assert exc.code in (0, None), (command, exc.code)
            assert "al_manager.commands." + command in sys.modules, command
        assert "torch" not in sys.modules, "torch was imported by a nanosil post-processing command"
        print("ok", len(names))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout
    for name in ("s.csv", "s.png", "c.png", "sum.txt", "sum.png", "n.csv", "n.png", "nc.json", "nc.png", "nsum.txt",
                 "nsum.png"):
        assert (tmp_path / name).exists(), name
