"""The seven emotion classes and the folder names public datasets use for them."""

LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")

# Folder names seen in FER2013, FER+, CK+, RAF-DB, AffectNet and JAFFE exports. Only names with
# an unambiguous meaning are listed: CK+'s "contempt" has no class here and must stay unknown.
_ALIASES: dict[str, str] = {
    "anger": "angry",
    "angry": "angry",
    "an": "angry",
    "disgust": "disgust",
    "disgusted": "disgust",
    "di": "disgust",
    "fear": "fear",
    "fearful": "fear",
    "afraid": "fear",
    "scared": "fear",
    "fe": "fear",
    "happy": "happy",
    "happiness": "happy",
    "joy": "happy",
    "ha": "happy",
    "neutral": "neutral",
    "calm": "neutral",
    "ne": "neutral",
    "sad": "sad",
    "sadness": "sad",
    "sa": "sad",
    "surprise": "surprise",
    "surprised": "surprise",
    "su": "surprise",
}


def canonical_label(name: str) -> str | None:
    """Map a dataset's class folder name onto one of LABELS, or None when it means none of them.

    Returning None rather than raising lets evaluation count and report images of unknown classes
    instead of dropping them silently or failing a whole run.
    """
    return _ALIASES.get(name.strip().lower().replace("-", "_").replace(" ", "_"))
