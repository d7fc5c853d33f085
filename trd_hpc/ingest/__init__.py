"""Real cohorts in: ``trd-hpc ingest SPEC.yaml --out DIR``.

A spec (each paper's ``INGEST_SPEC``: ``trd_hpc.tasks.emt.config.EMTIngestSpec``, ``...cnn3d.config.CNN3DIngestSpec``) names a participants
table, a path template for each subject's NIfTI image and, for the EMT, a PLINK fileset.
``resolve`` checks it against the files (every subject's image header, the genotype
index, the table's columns and values) and returns the cohort config recorded in the
manifest; the shards are then written by the same machinery as a synthetic cohort
(``trd_hpc.data.generate``: temporary names, checksums, reruns, SLURM array tasks), with
the ingested cohort kinds of the paper folders (``trd_hpc.tasks.*.ingested``) reading each subject from its
files instead of generating it.

    table.py      the participants table (pandas): ids, labels, clinical values
    images.py     NIfTI (nibabel) -> RAS -> the target grid over the brain's bounding box
    genotypes.py  PLINK .bed/.bim/.fam (bed-reader), individuals matched by IID
    resolve.py    spec + files -> the cohort config; each subject's sources
    kinds.py      what the ingested cohort kinds share (trace columns, labels, splits)
"""
