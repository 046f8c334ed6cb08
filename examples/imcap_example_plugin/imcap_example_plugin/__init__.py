"""An imcap plugin: importing this package registers its components (one class per module).

- `attention.CosineAttention`: the `cosine` attention variant (conf/model/attention/cosine.yaml)
- `stripes.StripesSource`: the `stripes` dataset source (conf/data/stripes.yaml)
"""

from imcap_example_plugin import attention, stripes  # noqa: F401  (importing them registers them)
