# Sourced by the scripts: activates this clone's .venv and keeps DeepSpeed's JIT-built ops
# (cpu_adam, async_io) in it. torch guards each op build with a lock file that a killed
# process leaves behind, and every later load then waits on it forever; a build folder owned by the
# clone cannot be blocked by another checkout's (or an earlier, killed run's) shared ~/.cache.
# Set TORCH_EXTENSIONS_DIR yourself to share builds between clones.
# Works from any directory: the clone is the folder above this file's.
MTMOE_CLONE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$MTMOE_CLONE/.venv/bin/activate"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$MTMOE_CLONE/.venv/torch_extensions}"
