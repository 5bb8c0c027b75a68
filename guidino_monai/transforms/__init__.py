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

from __future__ import annotations

from .dictionary import (
    FitEllipseD,
    FitEllipsed,
    FitEllipseDict,
    KeepLargestFilledComponentD,
    KeepLargestFilledComponentd,
    KeepLargestFilledComponentDict,
    AddCoordinatesD,
    AddCoordinatesd,
    AddCoordinatesDict,
    SpatialPadWithCoordinatesD,
    SpatialPadWithCoordinatesd,
    SpatialPadWithCoordinatesDict,
    SplitGuidedOutputD,
    SplitGuidedOutputd,
    SplitGuidedOutputDict,
)

__all__ = [
    "FitEllipseD",
    "FitEllipseDict",
    "FitEllipsed",
    "KeepLargestFilledComponentD",
    "KeepLargestFilledComponentDict",
    "KeepLargestFilledComponentd",
    "AddCoordinatesD",
    "AddCoordinatesDict",
    "AddCoordinatesd",
    "SpatialPadWithCoordinatesD",
    "SpatialPadWithCoordinatesDict",
    "SpatialPadWithCoordinatesd",
    "SplitGuidedOutputD",
    "SplitGuidedOutputDict",
    "SplitGuidedOutputd",
]
