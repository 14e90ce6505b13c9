"""Every byte layout stemstream reads or writes: raw 4D Camera records and files, data-path
messages, analysis partials, the ledger, stempy's counted HDF5, PNG images."""
