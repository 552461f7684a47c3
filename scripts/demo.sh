#!/usr/bin/env bash
# `make demo`: from nothing to an actively learned committee and an anharmonic IR spectrum, ~10 min on 2 cores.
#
#   1. find the MgSiO3 (P1) and Mg2SiO4 (O1) global minima with GFN2-xTB (`nanosil structures`);
#   2. active learning on both (`nanosil al run examples/quickstart.toml`): normal-mode + FPS initial data,
#      parallel i-PI sampling with flagging, xTB labels, retraining, harmonic-frequency report;
#   3. a short NVT production run of P1 at 400 K with the final committee (i-PI + nanosil-driver) and its
#      IR spectrum from the dipole autocorrelation (scripts/ir_spectrum.py).
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
echo "final committee: $MODEL"

# ---------------------------------------------------------------- 3. IR spectrum
IR="$OUT/ir"
SPECTRA=""
if [ -f scripts/ir_spectrum.py ] && [ -f ipi_inputs/production_nvt.xml ]; then
    say "3/3 IR spectrum of P1 at 400 K: NVT production with the final committee"
    RUN="$IR/P1_400K_run"
    STEPS=8000           # 4 ps of 0.5 fs (the paper: 40 ps); the first 0.5 ps is discarded
    if [ ! -s "$RUN/nvt.dipole_0" ] || [ ! -f "$RUN/.done" ]; then
        rm -rf "$RUN"
        mkdir -p "$RUN"
        SOCK="nanosil_demo_$$"
        $PY - "$RUN" "$SOCK" "$STEPS" "$OUT/structures/MgSiO3_1_isomer01.xyz" <<'EOF'
import sys
from ipi_inputs import render_input
run, sock, steps, structure = sys.argv[1:]
render_input("production_nvt", run, socket=f"unix:{sock}", structure=structure, temperature=400.0, seed=7,
             steps=int(steps), prefix="nvt")
EOF
        (cd "$RUN" && exec i-pi nvt.xml > ipi.log 2>&1) &
        IPI_PID=$!
        trap 'kill $IPI_PID 2>/dev/null || true; rm -f /tmp/ipi_$SOCK' EXIT
        nanosil-driver --models "$MODEL" --structure "$RUN/nvt.init.xyz" --unix "$SOCK" --log-every 4000 \
            2>&1 | tee "$RUN/driver.log"
        wait $IPI_PID
        trap - EXIT
        touch "$RUN/.done"
    fi
    $PY scripts/ir_spectrum.py "$RUN/nvt.dipole_0" --timestep 0.5 --temperature 400 --discard-ps 0.5 \
        --depth-fs 1024 --max-wavenumber 2000 --out "$IR/P1_400K.csv" --plot "$IR/P1_400K.png"
    SPECTRA="$IR/P1_400K.csv, $IR/P1_400K.png"
else
    say "3/3 IR spectrum skipped: scripts/ir_spectrum.py or ipi_inputs/production_nvt.xml is missing"
fi

# ---------------------------------------------------------------- where things are
say "demo finished in $(( $(date +%s) - start )) s"
cat <<EOF
  structures      $OUT/structures/ (MgSiO3_1_isomer01.xyz = P1, Mg2SiO4_1_isomer01.xyz = O1)
  report          $WORKDIR/report.csv   (harmonic-frequency MAE/RMSE, validation errors, labels per iteration)
  learning curve  $WORKDIR/learning_curve.png
  log             $WORKDIR/al.log
  labels          $WORKDIR/data.db      (ASE database)
  models          $WORKDIR/models/      (final: $MODEL)
  spectra         ${SPECTRA:-none}
EOF
