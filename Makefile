# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean chromium dcmtk orthanc

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The report test opens the HTML in a real browser: Debian's headless Chromium.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing and not root: the browser test will be skipped"; fi; }

# The synthetic clinical studies are checked by an independent DICOM toolkit: Debian's dcmtk.
dcmtk:
	@command -v dcmdump >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk >/dev/null; \
	  else echo "dcmtk missing and not root: the dcmtk checks will be skipped"; fi; }

# The PACS the SRs go to and archives come from: Debian's Orthanc with its DICOMweb plugin. The
# package would start a system service on 8042/4242 where systemd runs; ours use free ports.
orthanc:
	@test -x /usr/sbin/Orthanc -a -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null; \
	  else echo "orthanc missing and not root: the PACS tests will be skipped"; fi; }

demo: $(STAMP) orthanc dcmtk
	$(BIN)/vfx-ray demo

# Everything, slow end-to-end tests included; pytest exits non-zero (5) when no test ran.
test: $(STAMP) chromium dcmtk orthanc
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -v --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
