#!/bin/bash
vendor_name=customize
