#!/usr/bin/env bash
# Device call of 2026-12-03 (twelfth session), at ab26274: value outliers inside pass 2's loop in a layout of their
# own, the key-outlier pass with 32*BN/GR slots per iteration. call_u.sh's steps (the decode tests compiled, the decode
# grid) with the compiled end-to-end rows at 128K only, KVQuant-3 beside fp16 StaticCache (LLaMA-2-7B shape,
# batch 1). carry: .whl
SKIPS=fp16-dynamic:eager,quanto-int4:eager,quanto-int2:eager,kvquant-3:eager,kvquant-4:compiled,kvquant-2:compiled \
CONTEXTS=131072 TOTAL=${TOTAL:-560} exec bash "$(dirname "$0")/call_u.sh"
