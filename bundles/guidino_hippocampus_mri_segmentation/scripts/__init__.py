# Copyright (c) guidino-monai contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""The bundle's custom code (model-zoo convention: ``<bundle>/scripts``).

A packed bundle (``python -m guidino_monai.bundle.pack``) carries the ``guidino_monai`` library it was packed with in
``scripts/guidino_monai``. The configs import this package first (``"$import scripts"``), which puts ``scripts/`` at
the front of ``sys.path`` so that ``guidino_monai`` resolves to the carried copy, the one that matches these configs
and weights, whenever the bundle folder is importable (``PYTHONPATH=<bundle>``, the current folder, or the model
zoo's CI, which puts the bundle folder on ``sys.path``). ``PYTHONPATH=<bundle>/scripts`` (the zoo's documented
alternative) does the same without this file. In the source tree there is no carried copy and this does nothing: the
installed ``guidino_monai`` is used.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.isfile(os.path.join(_HERE, "guidino_monai", "__init__.py")) and _HERE not in sys.path:
    sys.path.insert(0, _HERE)
