"""Class names: read off a data set, carried in checkpoints, and used to match an evaluation folder to a model.

    names = dataset_class_names(dataset)          ['cat', 'dog', ...] in label order, or None when it has none
    mapping = label_map(folder_names, model_names)   folder label i -> model label mapping[i]

A model knows its classes by the names of the training split (stored in every checkpoint, see
carrot_zzz.weights); an evaluation folder numbers its own classes in sorted order. label_map matches them by name, so
a class folder that is missing just has no samples and the others keep their labels; a folder name the model does
not know is an error, since its images cannot be scored.
"""
import json
from typing import List, Optional, Sequence

__all__ = ['dataset_class_names', 'names_or_indices', 'label_map', 'parse_class_names']


def dataset_class_names(dataset) -> Optional[List[str]]:
    """Class names in label order: `dataset.classes`, else a timm reader's `class_to_idx`; None when neither exists
    or the labels have gaps."""
    names = getattr(dataset, 'classes', None)
    if names is None:
        mapping = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
        if mapping and sorted(mapping.values()) == list(range(len(mapping))):
            names = sorted(mapping, key=mapping.get)
    return [str(name) for name in names] if names else None


def names_or_indices(names: Optional[Sequence[str]], num_classes: int) -> List[str]:
    """`num_classes` names: the given ones, then the indices as text where names are missing."""
    names = list(names or [])
    return [str(names[i]) if i < len(names) else str(i) for i in range(num_classes)]


def label_map(folder_names: Sequence[str], model_names: Sequence[str]) -> List[int]:
    """[model label of folder class i]; ValueError naming the folder classes that the model does not have."""
    index = {name: i for i, name in enumerate(model_names)}
    unknown = [name for name in folder_names if name not in index]
    if unknown:
        shown = ', '.join(repr(n) for n in unknown[:5]) + (f' and {len(unknown) - 5} more' if len(unknown) > 5 else '')
        raise ValueError(f'the evaluation data has classes the model was not trained on: {shown}; remove those class '
                         f'folders or evaluate the checkpoint trained with them')
    return [index[name] for name in folder_names]


def parse_class_names(text: Optional[str], num_classes: Optional[int] = None) -> Optional[List[str]]:
    """The JSON list of class names stored in a checkpoint, checked: None for None; ValueError when it is not a list
    of distinct strings (of num_classes entries, when given)."""
    if text is None:
        return None
    try:
        names = json.loads(text)
    except (TypeError, ValueError) as e:
        raise ValueError(f'its class_names entry is not JSON ({e})') from e
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError('its class_names entry is not a list of distinct strings')
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f'its class_names entry lists {len(names)} names for {num_classes} classes')
    return names
