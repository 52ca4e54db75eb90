#!/usr/bin/env bash
# GPU checks that need no network (random-weight SD 1.5, ResNet-50, genrobust on the device): one table.
#
#   bench/gpu_check.sh [--smoke] [--compile] [--out FILE]
#
# Full run: a CUDA GPU, under 8 minutes on an H200; --smoke runs the same code on CPU at toy scale.
# The table is printed and, when OUT is set, written to $OUT/gpu_check.md.
#
# Python: $PYTHON if set, else this checkout's .venv, else python3 (on the device machine, the image's python3
# with torch). genrobust is imported from src/ (nothing installed). Needed packages: torch, diffusers,
# transformers, timm, accelerate, safetensors, pyyaml, pillow, numpy, tqdm. The nvidia-h200 image has all but
# diffusers (see /work/.library/device/KINDS.md); carry its wheel as .whl/diffusers-0.42.1-py3-none-any.whl
# (a pure-Python wheel, ~6 MB; `pip download --no-deps diffusers==0.42.1 -d .whl`) and this script installs
# it into /tmp/gpu_check_site.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi

if ! "$PY" -c "import diffusers" 2>/dev/null; then
    wheel=$(ls .whl/diffusers-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$wheel" ]; then
        echo "gpu_check: diffusers is not installed for $PY and no .whl/diffusers-*.whl was carried;" \
             "run \`pip download --no-deps diffusers==0.42.1 -d .whl\` where pip can reach PyPI" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site "$wheel"
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "diffusers", "transformers", "timm", "accelerate", "safetensors", "yaml", "PIL", "numpy", "tqdm"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages for $PY: $missing" >&2
    exit 2
fi

# Offline by construction; a passive OpenMP wait keeps --smoke from spinning on shared CPUs.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
"$PY" -c "import torch, diffusers, transformers, timm; print('gpu_check:', '$PY', 'torch', torch.__version__,
      'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__)"
exec "$PY" bench/gpu_check.py "$@"
