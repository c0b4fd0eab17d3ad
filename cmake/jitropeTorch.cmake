# Hints that let find_package(Torch) succeed with torch installed as a CUDA pip wheel, shared by
# jitrope's own build and the installed jitropeConfig.cmake (which runs find_dependency(Torch)).
# Include it before find_package(Torch); with Torch_DIR set, the wheel's folder is searched too.
# Nothing the caller has already set is changed.

# A CUDA build of torch looks for the toolkit even when no CUDA code is compiled; point it at the
# standard location when nvcc on PATH is a wrapper script that hides it.
if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR)
  if(DEFINED ENV{CUDA_HOME})
    set(CUDA_TOOLKIT_ROOT_DIR "$ENV{CUDA_HOME}")
  elseif(EXISTS "/usr/local/cuda/bin/nvcc")
    set(CUDA_TOOLKIT_ROOT_DIR "/usr/local/cuda")
  endif()
endif()
if(DEFINED CUDA_TOOLKIT_ROOT_DIR AND NOT DEFINED CUDAToolkit_ROOT)
  set(CUDAToolkit_ROOT "${CUDA_TOOLKIT_ROOT_DIR}")
endif()

# A CUDA wheel of torch brings NVRTC (and the cuBLAS/cuSPARSE headers ATen's CUDA headers include)
# in site-packages/nvidia/*/ rather than in the toolkit. Torch_DIR is site-packages/torch/share/cmake/Torch.
set(_jitrope_nvidia_lib_dirs)
set(JITROPE_NVIDIA_INCLUDE_DIRS)
if(Torch_DIR)
  get_filename_component(_jitrope_site "${Torch_DIR}/../../../.." ABSOLUTE)
  file(GLOB _jitrope_nvidia_lib_dirs "${_jitrope_site}/nvidia/*/lib")
  file(GLOB JITROPE_NVIDIA_INCLUDE_DIRS "${_jitrope_site}/nvidia/*/include")
endif()
find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
  HINTS "${CUDA_TOOLKIT_ROOT_DIR}/lib64" ${_jitrope_nvidia_lib_dirs})

# Without an arch list torch's CMake config probes the local GPU with a test program.
if("$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "" AND JITROPE_CUDA_ARCH_LIST)
  set(ENV{TORCH_CUDA_ARCH_LIST} "${JITROPE_CUDA_ARCH_LIST}")
endif()
