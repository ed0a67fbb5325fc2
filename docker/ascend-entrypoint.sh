#!/usr/bin/env bash
# Entry point of the Ascend image (docker/Dockerfile.ascend): CANN's environment, then the command.
# CANN's set_env.sh scripts set the library and operator paths MindSpore needs on Ascend; the driver's
# libraries come from the host (-v /usr/local/Ascend/driver:/usr/local/Ascend/driver:ro).
for env_script in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/nnal/atb/set_env.sh; do
  # shellcheck disable=SC1090  # CANN's own scripts, present only in CANN images
  [ -f "$env_script" ] && . "$env_script"
done
for lib_dir in /usr/local/Ascend/driver/lib64/common /usr/local/Ascend/driver/lib64/driver; do
  [ -d "$lib_dir" ] && LD_LIBRARY_PATH="$lib_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH
if [ ! -e /dev/davinci_manager ]; then
  echo "ascend-entrypoint: no /dev/davinci_manager: the NPU devices were not passed in (see docker/README.md)" >&2
fi
exec "$@"
