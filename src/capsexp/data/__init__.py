"""Data: the data sets capsexp reads, their transforms, the image folder reader, resumable sampling."""
