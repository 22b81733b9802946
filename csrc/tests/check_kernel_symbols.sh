#!/bin/sh
# ctest: the per-capability kernel files (cpu/kernels_avx2.cpp, cpu/kernels_avx512.cpp) define no
# weak symbol outside their own namespaces. Such a symbol is an inline function compiled for that
# file's instruction set; the linker keeps one copy of it for the whole library, and other files'
# calls would then run AVX2 or AVX-512 code on any CPU. See [Note: CPU capability builds].
# Arguments: the library's object files, as arguments or as one CMake list (add_test passes
# $<TARGET_OBJECTS:...> that way).
old_ifs=$IFS
IFS=';'
# Split on the semicolons only: the word splitting of an unquoted $* is the point here.
set -- $*
IFS=$old_ifs
status=0
checked=0
for object in "$@"; do
  case "$object" in
    *kernels_avx2.cpp.o) allowed='dldna_fused::cpu::avx2::|at::vec::AVX2::' ;;
    *kernels_avx512.cpp.o) allowed='dldna_fused::cpu::avx512::|at::vec::AVX2_AVX512_LOWBIT::|DW\.ref\.__gxx_personality_v0' ;;
    *) continue ;;
  esac
  checked=$((checked + 1))
  stray=$(nm -C --defined-only "$object" | awk '$2 ~ /^[WVu]$/' | grep -Ev "$allowed")
  if [ -n "$stray" ]; then
    echo "FAIL: $object defines weak symbols outside its namespaces:"
    echo "$stray"
    status=1
  else
    echo "ok: $object"
  fi
done
if [ "$checked" -ne 2 ]; then
  echo "FAIL: expected the objects of cpu/kernels_avx2.cpp and cpu/kernels_avx512.cpp, found $checked"
  status=1
fi
exit $status
