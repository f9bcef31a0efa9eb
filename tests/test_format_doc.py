#!/usr/bin/env python3
"""test_format_doc.py - model.h documents the format; its words must keep in
step with its code and with the Python side that writes and reads the files:
  - the version named in model.h's first line is MODEL_VERSION, and
    export/export.py and tests/testlib.py write and expect the same;
  - the ModelHeader struct's fields, in order, are the ones export.py packs
    (HEADER_FORMAT) and testlib.py reads (HEADER_FIELDS), with the same sizes;
  - every DTYPE_* and ATTENTION_* value of model.h has the same number in export.py."""
import os
import re
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import testlib  # noqa: E402

ROOT = testlib.ROOT
T = testlib.Checks()
with open(os.path.join(ROOT, "model.h")) as f:
    MODEL_H = f.read()
with open(os.path.join(ROOT, "export", "export.py")) as f:
    EXPORT_PY = f.read()

first_line = MODEL_H.splitlines()[0]
m_doc = re.search(r"version (\d+)", first_line)
m_code = re.search(r"^#define MODEL_VERSION (\d+)", MODEL_H, re.M)
m_export = re.search(r"^MODEL_VERSION = (\d+)", EXPORT_PY, re.M)
T.check("model_h_first_line_names_the_version_it_defines",
        m_doc is not None and m_code is not None and m_doc.group(1) == m_code.group(1),
        f"first line {first_line!r}, #define MODEL_VERSION {m_code and m_code.group(1)}")
T.check("export_py_writes_model_h_version",
        m_export is not None and m_code is not None and m_export.group(1) == m_code.group(1),
        f"export.py {m_export and m_export.group(1)}, model.h {m_code and m_code.group(1)}")
T.check("testlib_expects_model_h_version", m_code is not None and testlib.MODEL_VERSION == int(m_code.group(1)),
        f"testlib {testlib.MODEL_VERSION}, model.h {m_code and m_code.group(1)}")

# The struct's fields in order: "type name;" or "type name[N];" lines up to the padding
body = re.search(r"typedef struct \{(.*?)\} ModelHeader;", MODEL_H, re.S).group(1)
C_SIZES = {"uint32_t": 4, "int32_t": 4, "float": 4, "uint64_t": 8}
c_fields = []
for line in body.splitlines():
    line = line.split("//")[0].strip()
    fm = re.match(r"(\w+) (\w+)(?:\[(\w+)\])?;", line)
    if not fm or fm.group(2) == "pad":
        continue
    count = 8 if fm.group(3) == "MODEL_MAX_STOP_IDS" else int(fm.group(3) or 1)
    c_fields.append((fm.group(2), C_SIZES[fm.group(1)] * count))
py_fields = [(name, struct.calcsize("<" + code)) for name, code in testlib.HEADER_FIELDS]
T.check("testlib_header_fields_are_model_h_struct_fields_in_order", c_fields == py_fields,
        f"model.h {c_fields} vs testlib {py_fields}")
fmt = re.search(r'HEADER_FORMAT = \((.*?)\n\)', EXPORT_PY, re.S).group(1)
fmt = "".join(re.findall(r'"([^"]*)"', fmt))
T.check("export_py_header_format_has_model_h_field_bytes", struct.calcsize(fmt) == sum(n for _, n in c_fields),
        f"export.py packs {struct.calcsize(fmt)} bytes, model.h declares {sum(n for _, n in c_fields)}")

for enum in ("DTYPE", "ATTENTION"):
    c_values = {}
    for body in re.findall(r"enum \{([^}]*)\};", MODEL_H):
        for name, value in re.findall(r"(" + enum + r"_\w+) = (\d+)", body):
            c_values[name] = int(value)
    py_values = {}
    for line in re.findall(r"^(" + enum + r"_\w+(?:, " + enum + r"_\w+)*) = ([-0-9, ]+(?:#.*)?)$", EXPORT_PY, re.M):
        names = line[0].split(", ")
        values = [int(v) for v in line[1].split("#")[0].split(",")]
        py_values.update(zip(names, values))
    T.check(f"export_py_{enum.lower()}_values_are_model_h_values", c_values and c_values == py_values,
            f"model.h {c_values}, export.py {py_values}")
sys.exit(1 if T.failed else 0)
