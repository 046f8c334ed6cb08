"""An imcap plugin: importing this package registers its components (one class per module).

- `attention.CosineAttention`: the `cosine` attention variant (conf/model/attention/cosine.yaml)
- `patches.PatchEncoder`: the `patches` encoder (conf/model/encoder/patches.yaml)
- `stripes.StripesSource`: the `stripes` dataset source (conf/data/stripes.yaml)
- `distinct.Distinct1`: the `distinct-1` metric (no YAML: it is named in `model.test_metrics`)
"""

from imcap_example_plugin import attention, distinct, patches, stripes  # noqa: F401  (importing them registers them)
