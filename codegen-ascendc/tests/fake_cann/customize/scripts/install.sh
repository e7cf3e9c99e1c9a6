#!/bin/bash
vendor_name=customize
echo "fake install of $vendor_name"
