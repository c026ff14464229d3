# Included by llama.cpp's own project() (CMAKE_PROJECT_llama.cpp_INCLUDE, set by scripts/models):
# llama-cpp-python forces llama.cpp's `common` library on, which only its multimodal part (LLAVA_BUILD,
# off here) links; the Python package loads libllama and libggml alone. Skipping `common` (57 of
# the 140 build steps) halves the compile: 159 s -> 80 s on 2 idle cores.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama: build common utils library" FORCE)
