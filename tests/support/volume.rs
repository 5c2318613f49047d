//! Files replaced the way kubelet updates a Secret or ConfigMap volume.

use std::path::Path;

/// Fills a new timestamped directory with `fill`, then swaps the `..data` symlink that the volume's
/// files point through (see [`link_files`]) in one rename: readers see the old set or the new one.
pub fn swap(volume: &Path, generation: usize, fill: impl FnOnce(&Path)) {
    let version = volume.join(format!("..2026_11_25_{generation:04}"));
    std::fs::create_dir_all(&version).expect("a version directory");
    fill(&version);
    let tmp = volume.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version.file_name().expect("a name"), &tmp).expect("symlink");
    std::fs::rename(&tmp, volume.join("..data")).expect("swap");
}

/// The volume's files `names`, each a link through `..data`, as kubelet lays them out.
pub fn link_files(volume: &Path, names: &[&str]) {
    for name in names {
        std::os::unix::fs::symlink(format!("..data/{name}"), volume.join(name)).expect("symlink");
    }
}
