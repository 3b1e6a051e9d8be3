"""tokenhub: an open-source token hub for LLM APIs.

The meter (exact, fast token counting) is available as :class:`tokenhub.Meter`.
"""

from tokenhub._core import VocabError, __version__
from tokenhub.meter import Meter, StreamCounter
from tokenhub.vocabs import VocabNotFound

__all__ = ["Meter", "StreamCounter", "VocabError", "VocabNotFound", "__version__"]
