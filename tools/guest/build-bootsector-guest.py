#!/usr/bin/env python3
"""Build the boot-sector test guest: a 1 MiB raw disk whose MBR is a tiny real-mode program.

Usage: tools/guest/build-bootsector-guest.py OUTPUT_PATH
       tools/guest/build-bootsector-guest.py --listing   (print the assembled program)

The program (hand-assembled below, listing beside the bytes) runs straight from
SeaBIOS on QEMU's ``pc`` (i440fx + PIIX4) machine:

1. initialises COM1 (0x3F8) to 115200 8N1 and prints ``GUEST-READY`` on it;
2. arms the ACPI power button: clears PWRBTN_STS and sets PWRBTN_EN in the PIIX4 PM1a
   event block (QEMU only latches the button into PWRBTN_STS while PWRBTN_EN is set);
3. sleeps with ``hlt`` (woken by SeaBIOS's 18.2 Hz PIT tick, so an idle guest costs
   almost no host CPU) and after each wake-up polls PM1a_STS bit 8 (PWRBTN_STS);
4. on a power-button press (libvirt ``virsh shutdown`` / ``virDomain.shutdown()``) prints
   ``GUEST-POWEROFF`` and writes SLP_EN | SLP_TYP=0 (0x2000) to PM1a_CNT: S5 in QEMU's
   PIIX4 DSDT (``\\_S5 = {0, 0}``), so QEMU powers off.

Facts checked on QEMU 7.2 / SeaBIOS 1.16 (``info mtree``): SeaBIOS maps the PIIX4 PM I/O
block at 0x600 (PM1a_EVT_BLK 0x600: status 0x600, enable 0x602; PM1a_CNT_BLK 0x604;
PM timer 0x608). SCI_EN is not needed: the status bit is polled, no SCI is used.
A reset (virsh reset/reboot) runs the program again; managed save/restore resumes the
polling loop. Works under KVM (no protected mode, no memory touched beyond 0x7C00).

Nothing outside the Python standard library is used; the output is written to
OUTPUT_PATH.tmp.<pid> and renamed, so the build is atomic; it always gives the same
bytes, and an OUTPUT_PATH that already holds them is left untouched.
"""

import os
import sys

ORG = 0x7C00          # SeaBIOS loads the MBR at 0000:7C00
COM1 = 0x3F8
PM_BASE = 0x600       # PIIX4 PMBA as programmed by SeaBIOS on QEMU's pc machine
PM1A_STS = PM_BASE + 0
PM1A_EN = PM_BASE + 2
PM1A_CNT = PM_BASE + 4
PWRBTN = 0x0100       # PWRBTN_STS / PWRBTN_EN (bit 8)
SLP_EN_S5 = 0x2000    # SLP_EN (bit 13) | SLP_TYP 0 (bits 10-12) = S5 in QEMU's DSDT
IMAGE_SIZE = 1024 * 1024


def lo(v):
    return v & 0xFF


def hi(v):
    return (v >> 8) & 0xFF


def w(v):
    """Little-endian 16-bit immediate."""
    return [lo(v), hi(v)]


def rel8(target):
    """Short jump displacement, resolved once all label addresses are known."""
    return ("rel8", target)


def rel16(target):
    return ("rel16", target)


def abs16(target):
    return ("abs16", target)


# The program: (label,) entries name the next address, (bytes, assembly) entries are
# instructions. Opcodes are written by hand; only label displacements are computed.
PROGRAM = [
    ("start",),
    ([0xFA], "cli"),
    ([0x31, 0xC0], "xor ax, ax"),
    ([0x8E, 0xD8], "mov ds, ax                 ; DS = 0 (string addresses are absolute)"),
    ([0x8E, 0xD0], "mov ss, ax"),
    ([0xBC] + w(ORG), "mov sp, 0x7C00             ; stack grows down below the MBR"),
    ([0xEA, abs16("main"), 0x00, 0x00], "jmp 0x0000:main            ; CS:IP := 0000:7Cxx"),
    ("main",),
    ([0xFC], "cld"),
    ([0xFB], "sti                        ; the PIT tick must wake hlt"),
    # --- COM1: 115200 baud, 8N1, FIFOs on, DTR|RTS, no UART interrupts
    ([0xBA] + w(COM1 + 1), "mov dx, 0x3F9              ; IER"),
    ([0x30, 0xC0], "xor al, al"),
    ([0xEE], "out dx, al                 ; no UART interrupts"),
    ([0xBA] + w(COM1 + 3), "mov dx, 0x3FB              ; LCR"),
    ([0xB0, 0x80], "mov al, 0x80"),
    ([0xEE], "out dx, al                 ; DLAB = 1"),
    ([0xBA] + w(COM1 + 0), "mov dx, 0x3F8              ; DLL"),
    ([0xB0, 0x01], "mov al, 1"),
    ([0xEE], "out dx, al                 ; divisor 1 = 115200 baud"),
    ([0x42], "inc dx                     ; 0x3F9 = DLM"),
    ([0x30, 0xC0], "xor al, al"),
    ([0xEE], "out dx, al"),
    ([0xBA] + w(COM1 + 3), "mov dx, 0x3FB              ; LCR"),
    ([0xB0, 0x03], "mov al, 3"),
    ([0xEE], "out dx, al                 ; 8N1, DLAB = 0"),
    ([0x42], "inc dx                     ; 0x3FC = MCR"),
    ([0xEE], "out dx, al                 ; DTR | RTS"),
    ([0xBA] + w(COM1 + 2), "mov dx, 0x3FA              ; FCR"),
    ([0xB0, 0x07], "mov al, 7"),
    ([0xEE], "out dx, al                 ; enable and clear FIFOs"),
    ([0xBE, abs16("msg_ready")], "mov si, msg_ready"),
    ([0xE8, rel16("puts")], "call puts                  ; GUEST-READY"),
    # --- arm the power button
    ([0xBA] + w(PM1A_STS), "mov dx, 0x600              ; PM1a_STS"),
    ([0xB8] + w(PWRBTN), "mov ax, 0x0100             ; PWRBTN"),
    ([0xEF], "out dx, ax                 ; write 1 to clear a stale PWRBTN_STS"),
    ([0xBA] + w(PM1A_EN), "mov dx, 0x602              ; PM1a_EN"),
    ([0xEF], "out dx, ax                 ; PWRBTN_EN = 1"),
    # --- wait for the button
    ("wait",),
    ([0xF4], "hlt                        ; sleep until the next interrupt (PIT, 55 ms)"),
    ([0xBA] + w(PM1A_STS), "mov dx, 0x600              ; PM1a_STS"),
    ([0xED], "in ax, dx"),
    ([0xA9] + w(PWRBTN), "test ax, 0x0100            ; PWRBTN_STS?"),
    ([0x74, rel8("wait")], "jz wait"),
    # --- power off: S5
    ([0xBE, abs16("msg_off")], "mov si, msg_off"),
    ([0xE8, rel16("puts")], "call puts                  ; GUEST-POWEROFF"),
    ([0xBA] + w(PM1A_CNT), "mov dx, 0x604              ; PM1a_CNT"),
    ([0xB8] + w(SLP_EN_S5), "mov ax, 0x2000             ; SLP_EN | SLP_TYP(S5) = 0"),
    ([0xEF], "out dx, ax                 ; QEMU powers off here"),
    ("dead",),
    ([0xF4], "hlt                        ; (not reached)"),
    ([0xEB, rel8("dead")], "jmp dead"),
    # --- puts: print the NUL-terminated string at DS:SI on COM1 (clobbers ax, dx, si)
    ("puts",),
    ([0xAC], "lodsb                      ; al = [si++]"),
    ([0x84, 0xC0], "test al, al"),
    ([0x74, rel8("puts_done")], "jz puts_done"),
    ([0x88, 0xC4], "mov ah, al                 ; keep the character"),
    ([0xBA] + w(COM1 + 5), "mov dx, 0x3FD              ; LSR"),
    ("puts_wait",),
    ([0xEC], "in al, dx"),
    ([0xA8, 0x20], "test al, 0x20              ; THRE: transmitter ready?"),
    ([0x74, rel8("puts_wait")], "jz puts_wait"),
    ([0xBA] + w(COM1), "mov dx, 0x3F8              ; THR"),
    ([0x88, 0xE0], "mov al, ah"),
    ([0xEE], "out dx, al"),
    ([0xEB, rel8("puts")], "jmp puts"),
    ("puts_done",),
    ([0xC3], "ret"),
    # --- data
    ("msg_ready",),
    (list(b"GUEST-READY\r\n\0"), 'db "GUEST-READY", 13, 10, 0'),
    ("msg_off",),
    (list(b"GUEST-POWEROFF\r\n\0"), 'db "GUEST-POWEROFF", 13, 10, 0'),
]


def item_size(item):
    return sum(2 if isinstance(b, tuple) and b[0] in ("rel16", "abs16") else 1 for b in item)


def assemble(program=PROGRAM, org=ORG):
    """Two passes: place labels, then emit bytes with displacements filled in."""
    labels, pc = {}, org
    for entry in program:
        if len(entry) == 1:
            labels[entry[0]] = pc
        else:
            pc += item_size(entry[0])
    code, listing, pc = bytearray(), [], org
    for entry in program:
        if len(entry) == 1:
            listing.append(f"{entry[0]}:")
            continue
        item, text = entry
        end = pc + item_size(item)
        out = []
        for b in item:
            if isinstance(b, tuple):
                kind, target = b
                if kind == "rel8":
                    d = labels[target] - end
                    if not -128 <= d <= 127:
                        raise ValueError(f"short jump to {target} out of range")
                    out.append(d & 0xFF)
                elif kind == "rel16":
                    out += w((labels[target] - end) & 0xFFFF)
                else:
                    out += w(labels[target])
            else:
                out.append(b)
        hexbytes = " ".join(f"{b:02X}" for b in out[:8])
        listing.append(f"  {pc:04X}  {hexbytes:<24} {text}")
        code += bytes(out)
        pc = end
    return bytes(code), listing


def build_mbr():
    code, listing = assemble()
    if len(code) > 446:
        raise ValueError(f"program is {len(code)} bytes; it must fit before the partition table")
    mbr = code + bytes(446 - len(code)) + _partition_table() + b"\x55\xAA"
    return mbr, listing


def _partition_table():
    """One partition entry (type 0x83, LBA 1 to the end of the image), so the
    disk looks like any partitioned raw disk: image inspectors (oslo.utils'
    format inspector, as Nova and the agent use it) refuse an MBR signature
    with an empty partition table."""
    sectors = IMAGE_SIZE // 512 - 1
    entry = (b"\x00"                      # not active: the MBR program is what boots
             + b"\x00\x02\x00"              # CHS start (unused by SeaBIOS here)
             + b"\x83"                      # type: Linux
             + b"\xfe\xff\xff"              # CHS end
             + (1).to_bytes(4, "little")    # first LBA
             + sectors.to_bytes(4, "little"))
    return entry + bytes(48)


def main(argv):
    if len(argv) == 2 and argv[1] == "--listing":
        mbr, listing = build_mbr()
        print("\n".join(listing))
        return 0
    if len(argv) != 2 or argv[1].startswith("-"):
        sys.stderr.write(f"usage: {argv[0]} OUTPUT_PATH   (or --listing to print the program)\n")
        return 2
    out = argv[1]
    mbr, _ = build_mbr()
    image = mbr + bytes(IMAGE_SIZE - len(mbr))
    try:
        with open(out, "rb") as f:
            if f.read(IMAGE_SIZE + 1) == image:
                return 0  # already up to date: leave the file (and its mtime) alone
    except OSError:
        pass
    tmp = f"{out}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(image)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
