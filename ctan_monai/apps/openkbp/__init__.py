"""OpenKBP (AAPM 2020 knowledge-based planning challenge): everything of this dataset in one place.

Modules: ``reader`` (the sparse CSV format, patients, writers), ``validation`` (folders, checks, datalists),
``conversion`` (the NIfTI cache), ``demo`` (synthetic patients), ``prepare`` (the bundle's data preparation and
case loading), ``inference``, ``evaluation`` (the DVH structures of the official score).


On-disk format, as the challenge publishes it (``provided-data/<split>/pt_<n>/``, ``split`` one of ``SPLITS``):

- every patient is a 128 x 128 x 128 grid. Each ``*.csv`` has the header ``,data`` and rows ``flat_index,value``;
  voxels that are not listed are 0. ``ct.csv`` and ``dose.csv`` (Gy) list values; masks (``possible_dose_mask.csv``
  and one ``<Structure>.csv`` per structure the patient has) leave the value column empty.
- ``flat_index`` is the C-order (row-major) ravel index of the array ``[row, column, slice]``, i.e.
  ``numpy.unravel_index(flat_index, (128, 128, 128))``, as the challenge's own loader does with ``np.put``.
- Axis orientation, found by looking at the real data (the spinal cord runs along axis 2, the brainstem lies at
  smaller axis-2 indices than the cord and the oesophagus at larger ones; the mandible and larynx lie at smaller
  axis-0 indices than the cord; ``LeftParotid`` lies at larger axis-1 indices than ``RightParotid``):

  - axis 0 (row): anterior -> posterior,
  - axis 1 (column): patient right -> patient left,
  - axis 2 (slice, ``AXIAL_AXIS``): superior -> inferior. ``volume[:, :, k]`` is one axial slice, seen as in a
    radiological viewer (anterior up, patient left on the right).

- ``voxel_dimensions.csv``: three numbers (no header), the voxel size in mm along axes 0, 1, 2.
- CT grey values mix 12- and 16-bit encodings; as the publishers recommend, the reader clips them to 0..4095
  (air near 0, soft tissue about 1000-1100). A negative value is an error, not clipped: it means the file holds
  Hounsfield units (air -1000), which clipping would turn into air.

Decisions documented here:

- Dose above 0 outside ``possible_dose_mask`` is reported as an ``OpenKBPDataWarning`` (not an error): the dose loss,
  the dose score and the DVH score only use voxels inside the mask, so such a dose does not change training or
  evaluation; it is still a sign of inconsistent files, so it is reported. (The 50 real patients have none.)
- A dose above ``MAX_PLAUSIBLE_DOSE_GY`` (150 Gy) is an error: no head-and-neck plan comes near it (the real
  patients' maxima are 50-100 Gy), and a dose in cGy or mGy would otherwise train a network 100 or 1000 times off.
- A training or validation patient whose dose is 0 in every voxel is an error: it is a placeholder or a failed
  export, and training on it teaches the network to predict no dose (a test patient's dose is not read for training).
- A folder holding a patient's files (``ct.csv``, ``possible_dose_mask.csv``) but not named ``pt_<n>`` is an error
  (:func:`misnamed_patient_folders`): leaving it out silently would train on part of the data.
- A file that does not end with a newline is an error: the publishers' files and this module's writer always end
  with one, and a file cut short usually ends inside a row, whose last index or value would be silently wrong.
- The NIfTI cache keeps the array exactly as above (no transpose), with an affine that maps it to RAS world
  coordinates (axis codes ``("P", "L", "I")``), so viewers and MONAI Label show the right geometry and
  ``nibabel.load(...).get_fdata()`` equals the reader's arrays. Files are ``.nii.gz``: the volumes are mostly air
  and compress several-fold (nibabel uses a fast gzip level); they are read once per run into memory.
- Label maps: 0 background, ``i`` the ``i``-th selected structure; where structures overlap (the real data has a few
  Brainstem/SpinalCord voxels in common) the structure listed first wins.
"""
