# Sourced by the launch scripts (not run on its own): helpers they share.
# shellcheck shell=bash

# The interpreter that runs the launcher and the trainer: one variable, so a virtual
# environment or a pyenv version is used by every process.
PYTHON=${PYTHON:-python}

# Print how many GPUs this process may use (0 when there are none): CUDA_VISIBLE_DEVICES if it
# is set ("0,1,2" -> 3; "" or "-1" -> 0), else what nvidia-smi lists.
count_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        if [[ -z "${CUDA_VISIBLE_DEVICES}" || "${CUDA_VISIBLE_DEVICES}" == "-1" ]]; then
            echo 0
            return
        fi
        local IFS=,
        # shellcheck disable=SC2086  # splitting on commas is the point
        set -- ${CUDA_VISIBLE_DEVICES}
        echo "$#"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# Export OMP_NUM_THREADS = CPU cores / processes on this machine (at least 1) unless the caller
# set it: each rank then gets its share of the cores instead of every rank claiming all of them
# (torchrun would otherwise force 1).
set_omp_threads() {
    local procs=$1 cores
    cores=$(nproc)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / procs > 0 ? cores / procs : 1 ))}
}
