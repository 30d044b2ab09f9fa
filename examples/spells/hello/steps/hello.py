#!/usr/bin/env python3
"""Print a greeting for the input's name (the input arrives as $INPUT_JSON)."""
import json
import os

with open(os.environ["INPUT_JSON"], encoding="utf-8") as handle:
    name = json.load(handle)["name"]
print(f"hello, {name}")
