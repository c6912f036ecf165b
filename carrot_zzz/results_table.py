"""A table of per-image results (one dict per row, the first column the file name) written in timm's inference.py
formats, without pandas where the format does not need it.

    write_table(rows, 'out/model-224', 'csv', filename_col='filename')   -> 'out/model-224.csv'
    rows = read_table('out/model-224.csv', 'csv', filename_col='filename')

    csv           a header, then one line a row; list cells (top-k > 1) as JSON lists ('[3, 1]')
    json          {filename: {column: value}}, indented (pandas' orient='index')
    json-records  one JSON object a line (orient='records', lines=True)
    json-split    {"columns": [...], "data": [[...], ...]}, indented (orient='split', no index)
    parquet       the file name as index (needs pandas and pyarrow: ImportError naming them otherwise)

Missing cells (a row of an unreadable image has no prediction) are empty in csv and null in JSON.
"""
import csv
import json
from collections import OrderedDict
from typing import Any, Dict, List

__all__ = ['RESULT_FORMATS', 'EXTENSIONS', 'table_columns', 'write_table', 'read_table', 'require_parquet']

EXTENSIONS = {'csv': '.csv', 'json': '.json', 'json-records': '.json', 'json-split': '.json', 'parquet': '.parquet'}
RESULT_FORMATS = tuple(EXTENSIONS)


def table_columns(rows: List[Dict[str, Any]]) -> List[str]:
    """The union of the rows' keys in first-seen order."""
    return list(OrderedDict((key, None) for row in rows for key in row))


def require_parquet() -> None:
    """ImportError with the install command when pandas or pyarrow is missing."""
    try:
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as e:
        raise ImportError(f'the parquet format needs pandas and pyarrow ({e.name} is missing): pip install pandas '
                          f'pyarrow, or pick csv / json') from e


def _cell(value: Any) -> str:
    if value is None:
        return ''
    return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def write_table(rows: List[Dict[str, Any]], base: str, fmt: str, filename_col: str = 'filename') -> str:
    """Write the rows to base + the format's extension; returns the path."""
    if fmt not in EXTENSIONS:
        raise ValueError(f'unknown results format {fmt!r}; pick one of {", ".join(RESULT_FORMATS)}')
    path = base + EXTENSIONS[fmt]
    columns = table_columns(rows)
    full = [{c: row.get(c) for c in columns} for row in rows]
    if fmt == 'parquet':
        require_parquet()
        import pandas
        pandas.DataFrame(full, columns=columns).set_index(filename_col).to_parquet(path)
        return path
    with open(path, 'w', newline='') as f:
        if fmt == 'csv':
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([[_cell(row[c]) for c in columns] for row in full])
        elif fmt == 'json':
            json.dump({row[filename_col]: {c: row[c] for c in columns if c != filename_col} for row in full}, f,
                      indent=4)
        elif fmt == 'json-records':
            f.writelines(json.dumps(row) + '\n' for row in full)
        else:
            json.dump({'columns': columns, 'data': [[row[c] for c in columns] for row in full]}, f, indent=4)
    return path


def _parse_cell(text: str) -> Any:
    """A csv cell back to a value: '' -> None, JSON numbers / lists / booleans, else the text."""
    if text == '':
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {'True': True, 'False': False}.get(text, text)


def read_table(path: str, fmt: str, filename_col: str = 'filename') -> List[Dict[str, Any]]:
    """The rows of a write_table file (csv cells parsed back to numbers, lists and booleans)."""
    if fmt == 'parquet':
        require_parquet()
        import pandas
        frame = pandas.read_parquet(path).reset_index()
        return [{k: (v.tolist() if hasattr(v, 'tolist') else v) for k, v in row.items()}
                for row in frame.to_dict(orient='records')]
    with open(path, newline='') as f:
        if fmt == 'csv':
            return [{k: (v if k == filename_col else _parse_cell(v)) for k, v in row.items()}
                    for row in csv.DictReader(f)]
        if fmt == 'json':
            return [{filename_col: name, **values} for name, values in json.load(f).items()]
        if fmt == 'json-records':
            return [json.loads(line) for line in f if line.strip()]
        split = json.load(f)
        return [dict(zip(split['columns'], values)) for values in split['data']]
