from patchcore_trt.cli import main

main()
