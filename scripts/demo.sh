#!/usr/bin/env bash
# `make demo`: from nothing to an actively learned committee and an anharmonic IR spectrum, ~10 min on 2 cores.
#
#   1. find the MgSiO3 (P1) and Mg2SiO4 (O1) global minima with GFN2-xTB (`nanosil structures`);
#   2. active learning on both (`nanosil al run examples/quickstart.toml`): normal-mode + FPS initial data,
#      parallel i-PI sampling with flagging, xTB labels, retraining, harmonic-frequency report;
#   3. a short NVT production run of P1 at 400 K with the final committee and its IR spectrum from the
#      dipole autocorrelation (`nanosil md`: i-PI + nanosil-driver, then the spectrum).
# Rerunning resumes: finished steps are kept (delete demo_output/ to start over).
# Make puts .venv/bin first on PATH; by hand: PATH=$PWD/.venv/bin:$PATH bash scripts/demo.sh
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=demo_output
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
PY=python
if [ -x .venv/bin/python ] && ! command -v nanosil >/dev/null 2>&1; then
    export PATH="$PWD/.venv/bin:$PATH"
fi
command -v nanosil >/dev/null || { echo "demo: nanosil is not installed (run: make install)" >&2; exit 2; }
start=$(date +%s)
say() { printf '\n== [%4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

# ---------------------------------------------------------------- 1. structures
say "1/3 starting structures: basin hopping with GFN2-xTB"
mkdir -p "$OUT/structures"
for formula in MgSiO3 Mg2SiO4; do
    if [ -f "$OUT/structures/${formula}_1_isomer01.xyz" ]; then
        echo "$OUT/structures/${formula}_1_isomer01.xyz exists: kept"
    else
        nanosil structures --formula "$formula" --units 1 --backend xtb --isomers 1 --starts 4 --steps 15 \
            --workers 2 --out "$OUT/structures"
    fi
done

# ---------------------------------------------------------------- 2. active learning
say "2/3 active learning: nanosil al run examples/quickstart.toml"
nanosil al run examples/quickstart.toml
WORKDIR="$OUT/al"
nanosil al status "$WORKDIR"
MODEL=$($PY - "$WORKDIR" <<'EOF'
import csv, sys
from pathlib import Path
rows = list(csv.DictReader(open(Path(sys.argv[1]) / "report.csv")))
print(Path(sys.argv[1]) / rows[-1]["model"])
EOF
)
MAE=$($PY - "$WORKDIR" <<'EOF'
import csv, sys
from pathlib import Path
r = list(csv.DictReader(open(Path(sys.argv[1]) / "report.csv")))[-1]
print(f"{float(r['harmonic_mae_cm-1']):.2f} cm^-1 (RMSE {float(r['harmonic_rmse_cm-1']):.2f}) after iteration "
      f"{r['iteration']}, {r['labels']} labels")
EOF
)
echo "final committee: $MODEL; harmonic-frequency MAE against GFN2-xTB: $MAE"

# ---------------------------------------------------------------- 3. IR spectrum
IR="$OUT/ir"
say "3/3 IR spectrum of P1 at 400 K: nanosil md (i-PI NVT + nanosil-driver with the final committee)"
if [ -f "$IR/P1_400K/spectrum.csv" ]; then
    echo "$IR/P1_400K/spectrum.csv exists: kept"
else
    # 0.5 ps equilibration + 4 ps production of 0.5 fs steps (the paper: 40 ps)
    nanosil md "$OUT/structures/MgSiO3_1_isomer01.xyz" --models "$MODEL" -T 400 --ps 4 --equilibration-ps 0.5 \
        --seed 7 --max-wavenumber 2000 --out "$IR/P1_400K" --overwrite
fi
SPECTRA="$IR/P1_400K/spectrum.csv, $IR/P1_400K/spectrum.png"

# ---------------------------------------------------------------- where things are
say "demo finished in $(( $(date +%s) - start )) s"
cat <<EOF
  structures      $OUT/structures/ (MgSiO3_1_isomer01.xyz = P1, Mg2SiO4_1_isomer01.xyz = O1)
  report          $WORKDIR/report.csv   (harmonic-frequency MAE/RMSE, validation errors, labels per iteration)
  accuracy        harmonic MAE vs GFN2-xTB $MAE
  learning curve  $WORKDIR/learning_curve.png
  log             $WORKDIR/al.log
  labels          $WORKDIR/data.db      (ASE database)
  models          $WORKDIR/models/      (final: $MODEL)
  spectra         ${SPECTRA:-none}
EOF
