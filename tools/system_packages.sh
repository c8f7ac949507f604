#!/usr/bin/env bash
# Install the Debian packages a make target needs, when they are missing.
#   tools/system_packages.sh browser   Chromium and a Japanese font (the browser tests)
#   tools/system_packages.sh network   iproute2 (the offline leg of test-portable)
#   tools/system_packages.sh pdf       TeX Live for XeLaTeX (and xeCJK), fonts, poppler-utils
# Several groups may be named at once.  Uses sudo when not root; does
# nothing when every command of the groups is already there.
set -euo pipefail

packages=()  # installed with their recommended packages (as before)
lean=()      # TeX Live: without recommends (documentation alone is 1 GB)
need() {  # need COMMAND PACKAGE...: the packages, if COMMAND is missing
  local command=$1
  shift
  command -v "$command" >/dev/null 2>&1 || packages+=("$@")
}
need_lean() {
  local command=$1
  shift
  command -v "$command" >/dev/null 2>&1 || lean+=("$@")
}

for group in "$@"; do
  case $group in
    browser)
      need chromium chromium
      # a Japanese font, for the Japanese edition's pages in the browser
      fc-list :lang=ja 2>/dev/null | grep -q . || lean+=(fonts-noto-cjk)
      ;;
    network) need ip iproute2 ;;
    pdf)
      # latexmk and XeLaTeX; the LaTeX packages Sphinx's LaTeX writer loads;
      # GNU FreeFont (Sphinx's default fonts for XeLaTeX); pdffonts and
      # pdftotext for the PDF's tests.  About 93 s on a fresh machine.
      need_lean latexmk latexmk
      need_lean xelatex texlive-xetex texlive-latex-recommended texlive-latex-extra \
        texlive-fonts-recommended fonts-freefont-otf
      need_lean pdffonts poppler-utils
      # the Japanese edition's PDF: xeCJK (texlive-lang-cjk; its ctexhook is
      # book/_latex/ctexhook.sty) and the Noto CJK fonts (Serif and Sans JP)
      kpsewhich xeCJK.sty >/dev/null 2>&1 || lean+=(texlive-lang-cjk)
      fc-list "Noto Serif CJK JP" 2>/dev/null | grep -q . || lean+=(fonts-noto-cjk)
      ;;
    *) echo "unknown group: $group (browser, network, pdf)" >&2; exit 2 ;;
  esac
done

if [ ${#packages[@]} -gt 0 ] || [ ${#lean[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -q
  if [ ${#packages[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${packages[@]}"
  fi
  if [ ${#lean[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${lean[@]}"
  fi
fi
