//! Datasets and loaders against torchvision: ImageFolder listing, CIFAR-100 binary parsing, the
//! eval transform, the decode cache, and each bad input's error.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use tch::{Device, Kind, Tensor};
use tucker_nb::data::{self, ImageFolder};
use tucker_nb::synthetic::{self, SyntheticFormat, SyntheticSpec};
use tucker_nb::{DataSource, Loader, Split, StorageOptions, Transform};

fn spec(classes: usize, train: usize, val: usize, size: u32) -> SyntheticSpec {
    SyntheticSpec {
        classes,
        train_per_class: train,
        val_per_class: val,
        size,
        seed: 5,
    }
}

#[test]
fn image_folder_classes_and_labels_equal_torchvisions() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    synthetic::generate(&root, spec(3, 3, 1, 8), SyntheticFormat::ImageFolder).unwrap();
    let train = root.join("train");
    // Things torchvision also skips or also includes: a nested folder, an upper-case extension,
    // a non-image and an extension-less hidden file.
    fs::create_dir_all(train.join("class_001/nested/deeper")).unwrap();
    fs::copy(
        train.join("class_001/00001.png"),
        train.join("class_001/nested/deeper/z.PNG"),
    )
    .unwrap();
    fs::copy(
        train.join("class_001/00001.png"),
        train.join("class_001/nested/a.png"),
    )
    .unwrap();
    fs::copy(
        train.join("class_002/00002.png"),
        train.join("class_002/0.png"),
    )
    .unwrap();
    fs::write(train.join("class_000/notes.txt"), "not an image").unwrap();
    fs::write(train.join("class_000/.DS_Store"), "x").unwrap();

    let ours = ImageFolder::scan(&train).unwrap();
    let listing = dir.path().join("listing.json");
    oracle(&["image-folder", path_str(&train), path_str(&listing)]);
    let theirs: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&listing).unwrap()).unwrap();
    let classes: Vec<String> = serde_json::from_value(theirs["classes"].clone()).unwrap();
    let samples: Vec<(String, i64)> = serde_json::from_value(theirs["samples"].clone()).unwrap();
    assert_eq!(ours.classes, classes);
    let ours: Vec<(String, i64)> = ours
        .samples
        .iter()
        .map(|(p, l)| (p.to_string_lossy().into_owned(), *l))
        .collect();
    assert_eq!(ours, samples);
}

#[test]
fn hidden_folders_and_files_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    synthetic::generate(&root, spec(2, 2, 1, 8), SyntheticFormat::ImageFolder).unwrap();
    let train = root.join("train");
    fs::create_dir_all(train.join(".ipynb_checkpoints")).unwrap();
    fs::copy(
        train.join("class_000/00000.png"),
        train.join("class_000/.hidden.png"),
    )
    .unwrap();
    let folder = ImageFolder::scan(&train).unwrap();
    assert_eq!(folder.classes, ["class_000", "class_001"]);
    assert_eq!(folder.samples.len(), 4);
}

#[test]
fn cifar100_binary_records_parse_to_fine_labels_and_planes() {
    let dir = tempfile::tempdir().unwrap();
    // Three hand-made records: coarse, fine, then R, G, B planes of 1024 bytes each.
    let mut bytes = Vec::new();
    for (coarse, fine) in [(1u8, 7u8), (19, 99), (0, 0)] {
        bytes.push(coarse);
        bytes.push(fine);
        for plane in 0..3u8 {
            bytes.extend((0..1024u32).map(|i| (i as u8).wrapping_add(plane * 50 + fine)));
        }
    }
    let file = dir.path().join("train.bin");
    fs::write(&file, &bytes).unwrap();
    let data = data::read_cifar100(&file).unwrap();
    assert_eq!(Vec::<i64>::try_from(&data.labels).unwrap(), [7, 99, 0]);
    assert_eq!(data.images.size(), [3, 3, 32, 32]);
    // Record 1, green plane, row 2, column 5: byte index 2·32 + 5 = 69, plus 50 + 99.
    assert_eq!(data.images.int64_value(&[1, 1, 2, 5]), 69 + 50 + 99);
    assert_eq!(data.names[2], "train.bin#2");

    fs::write(&file, &bytes[..bytes.len() - 5]).unwrap();
    let e = data::read_cifar100(&file).unwrap_err().to_string();
    assert!(e.contains("train.bin") && e.contains("3074-byte"), "{e}");
    bytes[3074 + 1] = 100;
    fs::write(&file, &bytes).unwrap();
    let e = data::read_cifar100(&file).unwrap_err().to_string();
    assert!(
        e.contains("record 1") && e.contains("fine label 100"),
        "{e}"
    );
}

#[test]
fn generated_cifar_binary_and_image_folder_hold_the_same_images() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(4, 3, 2, 32);
    synthetic::generate(&dir.path().join("bin"), s, SyntheticFormat::Cifar100Binary).unwrap();
    synthetic::generate(&dir.path().join("png"), s, SyntheticFormat::ImageFolder).unwrap();
    let source = DataSource::detect(&dir.path().join("bin")).unwrap();
    assert!(matches!(source, DataSource::Cifar100(_)));
    let (train, val) = source.load_both(StorageOptions::default()).unwrap();
    assert_eq!((train.len(), val.len(), train.classes.len()), (12, 8, 100));
    let png = DataSource::detect(&dir.path().join("png"))
        .unwrap()
        .load(Split::Train, StorageOptions::default())
        .unwrap();
    // ImageFolder orders by class; the binary file interleaves classes (image i has class i % 4).
    for (i, name) in png.names.iter().enumerate() {
        let index: i64 = name
            .rsplit('/')
            .next()
            .unwrap()
            .trim_end_matches(".png")
            .parse()
            .unwrap();
        assert!(
            png.images.get(i as i64).equal(&train.images.get(index)),
            "{name}"
        );
        assert_eq!(
            png.labels.int64_value(&[i as i64]),
            train.labels.int64_value(&[index])
        );
    }
}

fn eval_parity(image_px: u32, size: i64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    synthetic::generate(&root, spec(3, 2, 2, image_px), SyntheticFormat::ImageFolder).unwrap();
    let theirs = dir.path().join("theirs.safetensors");
    oracle(&[
        "eval-transform",
        path_str(&root.join("val")),
        path_str(&theirs),
        "--size",
        &size.to_string(),
    ]);
    let theirs = &read(&theirs)["images"];
    let val = DataSource::detect(&root)
        .unwrap()
        .load(Split::Val, StorageOptions::default())
        .unwrap();
    let loader = Loader::new(&val, 4, Transform::Eval { size }, Device::Cpu, false);
    let ours = Tensor::cat(&loader.epoch(0).map(|b| b.images).collect::<Vec<_>>(), 0);
    assert_eq!(ours.size(), theirs.size());
    (ours - theirs).abs().max().double_value(&[])
}

#[test]
fn eval_transform_matches_torchvision_within_2e_2() {
    for (px, size) in [(32, 32), (32, 224), (64, 32), (40, 64)] {
        let err = eval_parity(px, size);
        eprintln!("eval transform, {px} px images at size {size}: max abs diff {err:.5}");
        assert!(
            err < 2e-2,
            "{px} px images at size {size}: max abs diff {err}"
        );
    }
}

#[test]
fn second_load_comes_from_the_cache_and_changes_invalidate_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    synthetic::generate(&root, spec(2, 4, 1, 16), SyntheticFormat::ImageFolder).unwrap();
    let source = DataSource::detect(&root).unwrap();
    let first = source
        .load(Split::Train, StorageOptions::default())
        .unwrap();
    let cache_dir = root.join(".tucker_nb_cache");
    let caches = || fs::read_dir(&cache_dir).unwrap().count();
    assert_eq!(caches(), 1);
    // A cache hit returns the cached bytes: prove it by planting a marker in the cache file.
    let cache = fs::read_dir(&cache_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let decoded = first.images.copy();
    let cached = first.images.copy();
    let _ = cached.get(0).get(0).get(0).get(0).fill_(7);
    // Replaced by a rename, as tucker_nb replaces caches (a mapped file is never rewritten).
    let planted = cache.with_extension("planted");
    Tensor::write_safetensors(&[("images", &cached)], &planted).unwrap();
    fs::rename(&planted, &cache).unwrap();
    let second = source
        .load(Split::Train, StorageOptions::default())
        .unwrap();
    assert_eq!(second.images.int64_value(&[0, 0, 0, 0]), 7);
    // Touching the file list (a new image) changes the key: decoded afresh, a new cache file.
    fs::copy(
        root.join("train/class_000/00000.png"),
        root.join("train/class_000/zz.png"),
    )
    .unwrap();
    let third = source
        .load(Split::Train, StorageOptions::default())
        .unwrap();
    assert_eq!(third.len(), 9);
    assert!(third.images.get(0).equal(&decoded.get(0)));
    assert_eq!(caches(), 1, "the older cache of the split was not removed");
    assert!(!cache.exists());
    // Editing an image in place (same path, mtime restored) changes the key too.
    let edited = root.join("train/class_001/00001.png");
    let mtime = fs::metadata(&edited).unwrap().modified().unwrap();
    let mut img = image::open(&edited).unwrap().to_rgb8();
    img.put_pixel(0, 0, image::Rgb([1, 2, 3]));
    img.save(&edited).unwrap();
    fs::File::options()
        .write(true)
        .open(&edited)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let fourth = source
        .load(Split::Train, StorageOptions::default())
        .unwrap();
    assert_ne!(fourth.key, third.key);
    let at = fourth
        .names
        .iter()
        .position(|n| n.ends_with("class_001/00001.png"))
        .unwrap();
    assert_eq!(fourth.images.int64_value(&[at as i64, 0, 0, 0]), 1);
}

#[test]
fn mixed_sizes_are_stored_at_one_size() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    synthetic::generate(&root, spec(2, 2, 1, 32), SyntheticFormat::ImageFolder).unwrap();
    image::RgbImage::from_pixel(48, 20, image::Rgb([10, 200, 30]))
        .save(root.join("train/class_001/wide.png"))
        .unwrap();
    let source = DataSource::detect(&root).unwrap();
    let default = source
        .load(
            Split::Train,
            StorageOptions {
                no_cache: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(default.image_size(), (256, 256));
    let stated = source
        .load(
            Split::Train,
            StorageOptions {
                size: Some(40),
                no_cache: true,
            },
        )
        .unwrap();
    assert_eq!(stated.image_size(), (40, 40));
    let wide = stated
        .names
        .iter()
        .position(|n| n.ends_with("wide.png"))
        .unwrap() as i64;
    assert_eq!(stated.images.int64_value(&[wide, 1, 20, 20]), 200);
}

fn error_of(root: &Path) -> String {
    match DataSource::detect(root).and_then(|s| s.load_both(StorageOptions::default())) {
        Ok(_) => panic!("{} loaded", root.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_datasets_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &str| {
        let root = dir.path().join(name);
        synthetic::generate(&root, spec(2, 2, 1, 8), SyntheticFormat::ImageFolder).unwrap();
        root
    };
    let empty = make("empty");
    fs::create_dir_all(empty.join("train/class_002")).unwrap();
    let e = error_of(&empty);
    assert!(
        e.contains("empty/train/class_002") && e.contains("no image files"),
        "{e}"
    );

    let broken = make("broken");
    fs::write(
        broken.join("train/class_000/bad.png"),
        b"\x89PNG but not really",
    )
    .unwrap();
    let e = error_of(&broken);
    assert!(
        e.contains("class_000/bad.png") && e.contains("image"),
        "{e}"
    );

    let differ = make("differ");
    fs::rename(differ.join("val/class_001"), differ.join("val/class_00x")).unwrap();
    let e = error_of(&differ);
    assert!(
        e.contains("differ") && e.contains("`class_001` in train/ vs `class_00x` in val/"),
        "{e}"
    );

    let e = error_of(&dir.path().join("nothing-here"));
    assert!(
        e.contains("nothing-here") && e.contains("neither an ImageFolder root"),
        "{e}"
    );
    let _ = Kind::Float;
}

#[test]
fn cifar_binary_converts_to_the_seeds_image_folder_layout() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    synthetic::generate(&bin, spec(3, 2, 1, 32), SyntheticFormat::Cifar100Binary).unwrap();
    let out = dir.path().join("cifar100");
    assert_eq!(
        data::convert_cifar100_to_image_folder(&bin, &out).unwrap(),
        9
    );
    let source = DataSource::detect(&out).unwrap();
    let (train, val) = source
        .load_both(StorageOptions {
            no_cache: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!((train.len(), val.len(), train.classes.len()), (6, 3, 3));
    let original = data::read_cifar100(&bin.join("train.bin")).unwrap();
    for (i, name) in train.names.iter().enumerate() {
        let index: i64 = name
            .rsplit('/')
            .next()
            .unwrap()
            .trim_end_matches(".png")
            .parse()
            .unwrap();
        assert!(
            train
                .images
                .get(i as i64)
                .equal(&original.images.get(index)),
            "{name}"
        );
    }
    // A second conversion into the same folder is refused and changes nothing.
    let e = data::convert_cifar100_to_image_folder(&bin, &out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cifar100") && e.contains("already exists"),
        "{e}"
    );
}

#[test]
fn oversized_and_extreme_images_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let class = dir.path().join("train/a");
    fs::create_dir_all(&class).unwrap();
    let folder = |name: &str, w: u32, h: u32| {
        for entry in fs::read_dir(&class).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
        image::RgbImage::from_pixel(w, h, image::Rgb([9, 9, 9]))
            .save(class.join(name))
            .unwrap();
        ImageFolder::scan(&dir.path().join("train")).unwrap()
    };
    // Wider than the decoder's limit: refused from its header.
    let wide = folder("wide.png", data::MAX_DECODE_SIDE + 1, 1);
    let e = data::decode_images(&wide, Some(32))
        .unwrap_err()
        .to_string();
    assert!(e.contains("wide.png") && e.contains("limit"), "{e}");
    // Within the limit, but resizing its shorter side to 256 would make 4 G pixels.
    let strip = folder("strip.png", 16_000, 1);
    let e = data::decode_images(&strip, Some(256))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("strip.png") && e.contains("aspect ratio is too extreme"),
        "{e}"
    );
    // The same strip stored at 2 px is fine.
    assert_eq!(
        data::decode_images(&strip, Some(2)).unwrap().size(),
        [1, 3, 2, 2]
    );
}

#[test]
fn cached_datasets_are_memory_mapped_and_batches_read_the_same_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    synthetic::generate(&root, spec(3, 5, 1, 16), SyntheticFormat::ImageFolder).unwrap();
    let source = DataSource::detect(&root).unwrap();
    let mapped = source
        .load(Split::Train, StorageOptions::default())
        .unwrap();
    let in_memory = source
        .load(
            Split::Train,
            StorageOptions {
                no_cache: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(mapped.mapped.is_some() && in_memory.mapped.is_none());
    assert_eq!(mapped.key, in_memory.key);
    assert!(mapped.images.equal(&in_memory.images));
    // Batches gathered from the map (which hands their pages back) equal those from memory,
    // epoch after epoch.
    let loader = |d| Loader::new(d, 4, Transform::Eval { size: 16 }, Device::Cpu, true);
    let (a, b) = (loader(&mapped), loader(&in_memory));
    for epoch in 0..2 {
        for (x, y) in a.epoch(epoch).zip(b.epoch(epoch)) {
            assert!(x.images.equal(&y.images));
        }
    }
}
