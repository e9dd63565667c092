// Package guest makes what boots inside a box: the kernel, the initramfs and
// the root disk images.
//
// Vocabulary:
//
//   - Image: a root filesystem for boxes, an ext4 disk stored in the chunk
//     store as a disk snapshot named "image.NAME" and labelled boxd.image=NAME.
//     The default, debian-bookworm, is Debian 12 made by debootstrap
//     (variant minbase, plus DefaultPackages). BuildImage makes it once;
//     ListImages finds the images in a graph.
//   - Base file: an image exported once to a raw, read-only, sparse file
//     (BaseFile), named for the image's content, that QEMU boxes use as the
//     backing file of their copy-on-write overlays.
//   - Kernel: Debian's cloud kernel, fetched without installing it (Kernel),
//     or one given by the user.
//   - Initramfs: a gzip newc archive whose /init is the static boxd-agent,
//     with the virtio modules a box needs under /lib/modules/boxd and their
//     load order in /lib/modules/boxd/order (Initramfs). The agent loads them,
//     mounts the root disk and switches to it; Cmdline tells it how.
//
// Everything is kept under boxd's root:
//
//	cache/rootfs/NAME/tree       the debootstrap tree of image NAME; NAME/source says how it was fetched
//	cache/rootfs/NAME.log        debootstrap's output from the last fetch
//	cache/guestkernel/PKG/       the unpacked kernel package
//	cache/initramfs/KEY.cpio.gz  initramfs images, KEY a hash of what went in
//	cache/build/                 a build's work space (staged tree, mkfs output), emptied when one starts
//	images/SNAPSHOT-KEY.raw      base files (BaseDir)
//
// The image snapshots themselves are in the store, with the others.
package guest
