# Sourced by bench/gpu.sh and bench/gpu_lab_real.sh with their arguments: the one option (--dry_run: DRY=1),
# the repository root as the working directory, and OUT's default.
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry_run) DRY=1 ;;
        *) echo "$0: unknown argument $arg (only --dry_run)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if (( DRY )); then OUT="${OUT:-${TMPDIR:-/tmp}/safedata-gpu-dry-run}"; else OUT="${OUT:-bench/results/gpu}"; fi
