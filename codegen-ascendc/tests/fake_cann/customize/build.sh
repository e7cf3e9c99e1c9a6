#!/bin/bash
# Stand-in for the template's build.sh: configure with the preset, build the
# kernels (target binary), then the .run package.
set -e
echo "template build.sh $*" >> "$(python3 -c 'import json,sys; d=json.load(open("CMakePresets.json")); print(d["configurePresets"][0]["cacheVariables"]["ASCEND_CANN_PACKAGE_PATH"]["value"])')/calls.log"
mkdir -p build_out
rm -rf build_out/*
cmake -S . -B build_out --preset=default
cmake --build build_out --target binary
cmake --build build_out --target package
