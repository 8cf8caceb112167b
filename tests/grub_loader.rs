//! The boot loader is built by the GRUB of the OS tree it boots when the tree has one
//! (chrooted `grub-mkimage`), by the host's otherwise, and the choice is reported.

use bootcfg::loader::{grub_efi_image, grub_efi_image_from, GrubFrom};
use integration_tests::*;

#[test]
fn the_trees_own_grub_is_preferred_and_the_fallback_says_why() {
    let w = scratch();
    let tree = w.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();

    let (_, from) = grub_efi_image_from(None, "/EFI/x").unwrap();
    assert!(
        matches!(from, GrubFrom::Host(ref why) if why == "no tree given"),
        "{from}"
    );
    let (_, from) = grub_efi_image_from(Some(&tree), "/EFI/x").unwrap();
    assert!(
        matches!(from, GrubFrom::Host(ref why) if why.contains("has no usr/bin/grub-mkimage")),
        "{from}"
    );

    // A tree with a working GRUB: the host's grub-mkimage with the libraries it loads, and
    // the x86_64-efi modules, copied in.
    sh(&format!(
        "cd {t} && mkdir -p usr/bin usr/lib/grub && cp /usr/bin/grub-mkimage usr/bin/ &&
         for l in $(ldd /usr/bin/grub-mkimage | grep -o '/[^ ]*'); do cp --parents -L $l .; done &&
         cp -a /usr/lib/grub/x86_64-efi usr/lib/grub/ && rm usr/lib/grub/x86_64-efi/loadenv.mod",
        t = tree.display()
    ));
    let (_, from) = grub_efi_image_from(Some(&tree), "/EFI/x").unwrap();
    assert!(
        matches!(from, GrubFrom::Host(ref why) if why.contains("lacks x86_64-efi modules: loadenv")),
        "{from}"
    );
    sh(&format!(
        "cp /usr/lib/grub/x86_64-efi/loadenv.mod {}/usr/lib/grub/x86_64-efi/",
        tree.display()
    ));
    let (image, from) = grub_efi_image_from(Some(&tree), "/EFI/x").unwrap();
    assert!(
        matches!(from, GrubFrom::Tree(ref v) if v.contains("grub-mkimage")),
        "{from}"
    );
    // Same GRUB, same modules: the same image as the host's; and nothing left in the tree.
    assert_eq!(image, grub_efi_image("/EFI/x").unwrap());
    let left: Vec<_> = std::fs::read_dir(&tree)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with(".reinstall-grub"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A tree whose grub-mkimage cannot run (a broken library): the host's, with the reason.
    sh(&format!(
        "cd {t} && for l in $(ldd /usr/bin/grub-mkimage | grep -o '/[^ ]*' | grep -v ld-linux); do : > .$l; done",
        t = tree.display()
    ));
    let (_, from) = grub_efi_image_from(Some(&tree), "/EFI/x").unwrap();
    assert!(
        matches!(from, GrubFrom::Host(ref why) if why.contains("its grub-mkimage failed")),
        "{from}"
    );
}
