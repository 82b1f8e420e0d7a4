"""HAM10000 (Tschandl et al., Sci. Data 2018): everything of this dataset in one place.

Modules: ``validation`` (layout, checks, datalist), ``splits`` (by lesion), ``sampling`` (class balance),
``transforms``, ``demo`` (synthetic images), ``prepare`` (the bundle's data preparation), ``inference``.


The official layout is a folder holding ``HAM10000_metadata.csv`` (columns ``lesion_id, image_id, dx, dx_type, age,
sex, localization``), the JPEG images in one or more folders named ``HAM10000_images*`` (the publishers ship
``HAM10000_images_part_1`` and ``HAM10000_images_part_2``; mirrors often merge them into ``HAM10000_images``) and the
lesion masks in ``HAM10000_segmentations_lesion_tschandl/<image_id>_segmentation.png``.

Choices made here (ours, documented):

- **The metadata CSV is the list of cases.** Every row must have its image and its mask; a row whose image or mask is
  missing is a reported problem, so that a partial copy is never mistaken for the whole dataset. With
  ``skip_bad=True`` the bad rows are dropped and listed (count and reasons) in the log instead. Image files that
  the CSV does not list are ignored.
- **Masks are read through their palette.** Some of the published masks are palette ("P" mode) PNGs whose palette
  is inverted (index 0 is white): reading their raw indices, as a plain array reader does, swaps lesion and skin.
  Every mask is therefore converted to 8-bit grey by PIL before it is thresholded (and images to RGB).
- **A mask covering the whole image is warned about, not refused.** Two masks of the real subset mark every pixel
  as lesion, and their images show lesions that fill the frame; but an inverted or blank white mask looks the same,
  so every such mask is named in a WARNING when the files are checked.
- **One grid for image and mask.** Images and masks may differ in size (the mirror's images are 200x150, the masks
  600x450); both are resized to ``size`` (image bilinear with anti-aliasing, mask nearest). Their aspect ratios must
  agree (validated). The default ``size`` is 224x224: the input size that ImageNet-pretrained ResNets are trained
  at, divisible by 32 (a 7x7 bottleneck after the five stride-2 stages), and close to the mirror's 200x150, so that
  little is invented by up-sampling. The 4:3 images are squashed to a square; the distortion is the same for every
  image. A ``(height, width)`` such as ``(192, 256)`` keeps the aspect ratio.
- **Splits are by lesion, stratified by diagnosis.** Several images may show one lesion; all of them go to the same
  split. Within each class the lesions are shuffled with ``seed`` and cut by the fractions (largest-remainder
  rounding). Written by hand because scikit-learn's stratified splitters either ignore groups or take no arbitrary
  fractions, and fail on the rare classes of small datasets.
- **Class imbalance** (nv is about two thirds of HAM10000) is handled, when asked, either by a
  ``WeightedRandomSampler`` (:func:`weighted_sampler`) or by class weights in the cross-entropy loss
  (:func:`class_weights`); ``method="none"`` switches either off. The weights are ``1 / n_c`` ("inverse_frequency")
  or ``1 / sqrt(n_c)`` ("inverse_sqrt"), scaled so that their mean over the samples is 1 (the loss keeps its scale).

Example:
    >>> from ctan_monai.apps.ham10000.demo import write_ham10000_demo
    >>> import tempfile
    >>> root = write_ham10000_demo(tempfile.mkdtemp(), n_images=14)
    >>> from ctan_monai.apps.ham10000.splits import split_by_lesion
    >>> from ctan_monai.apps.ham10000.transforms import eval_transforms
    >>> from ctan_monai.apps.ham10000.validation import build_datalist
    >>> datalist = build_datalist(root)
    >>> splits = split_by_lesion(datalist, seed=0)
    >>> sample = eval_transforms(224)(datalist[0])
    >>> tuple(sample["image"].shape), tuple(sample["seg"].shape)
    ((3, 224, 224), (1, 224, 224))
"""
