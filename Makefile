# qubes-wyng: build the packages, the man page, run the tests.
#
#   make rpm     build/qubes-wyng-dom0-V-1.noarch.rpm and build/qubes-wyng-vm-V-1.noarch.rpm
#   make deb     build/qubes-wyng-vm_V-1_all.deb (the backup-VM half, for Debian templates)
#   make man     regenerate doc/qvm-wyng.1 from dom0/qubeswyng/cli.py
#   make test    the whole test suite (make test-quick: without the slow package builds);
#                PYTHON=/path/to/venv/bin/python picks the interpreter with pytest
#   make clean   remove build/
#
# Everything is built under build/, from a source tarball of this tree;
# nothing is written into the source folders. doc/packaging.md explains the
# choices. The version is the one in the file "version".

VERSION := $(shell cat version)
NAME := qubes-wyng
BUILD := build
TOP := $(abspath $(BUILD))
TARBALL := $(BUILD)/$(NAME)-$(VERSION).tar.gz
PYTHON ?= python3
PYTEST ?= $(PYTHON) -m pytest
# the files a source package carries
SOURCES := version LICENSE README.md Makefile rpm_spec packaging dom0 backupvm qubes-rpc doc etc

# rpmbuild on a host without Fedora's Python RPM macros (e.g. Debian): load
# equivalents, and do not check BuildRequires against an RPM database that
# does not know the host's packages.
RPM_HAS_PYPROJECT := $(shell rpm --eval '%{defined:pyproject_wheel}' 2>/dev/null)
ifeq ($(RPM_HAS_PYPROJECT),1)
RPMBUILD_FLAGS ?=
else
RPMBUILD_FLAGS ?= --nodeps --load=$(abspath rpm_spec/pyproject-fallback.macros)
endif

# Debian builds use the system's Python, whatever virtualenv or pyenv comes
# first on PATH (pybuild runs "python3.X" from PATH).
DEB_PATH ?= /usr/sbin:/usr/bin:/sbin:/bin

# install paths (for the spec files and debian/rules)
DESTDIR ?=
SYSCONFDIR ?= /etc
BINDIR ?= /usr/bin
MANDIR ?= /usr/share/man
STATEDIR ?= /var/lib
UNITDIR ?= /usr/lib/systemd/system
LIBDIR ?= /usr/lib
SHEBANG ?= /usr/bin/python3

CHANGELOG_DATE := $(shell LC_ALL=C date -u -d @$${SOURCE_DATE_EPOCH:-$$(git log -1 --format=%ct 2>/dev/null || date +%s)} '+%a %b %d %Y')
DEB_DATE := $(shell LC_ALL=C date -u -R -d @$${SOURCE_DATE_EPOCH:-$$(git log -1 --format=%ct 2>/dev/null || date +%s)})

.PHONY: all rpm deb man test test-quick tarball clean install-dom0 install-vm

all: rpm deb

tarball: $(TARBALL)

$(TARBALL): FORCE
	mkdir -p $(BUILD)
	tar --create --gzip --file=$@ --sort=name --owner=0 --group=0 --numeric-owner \
	    --mtime=@0 --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' \
	    --exclude=build --transform='s,^,$(NAME)-$(VERSION)/,' $(SOURCES)

$(BUILD)/rpm/SPECS/%.spec: rpm_spec/%.spec.in version
	mkdir -p $(dir $@)
	sed -e 's/@VERSION@/$(VERSION)/g' \
	    -e 's/@CHANGELOG@/* $(CHANGELOG_DATE) qubes-wyng developers - $(VERSION)-1\n- qubes-wyng $(VERSION)/' \
	    $< > $@

rpm: $(TARBALL) $(BUILD)/rpm/SPECS/qubes-wyng-dom0.spec $(BUILD)/rpm/SPECS/qubes-wyng-vm.spec
	mkdir -p $(BUILD)/rpm/SOURCES
	cp $(TARBALL) $(BUILD)/rpm/SOURCES/
	for spec in qubes-wyng-dom0 qubes-wyng-vm; do \
	    rpmbuild -bb --quiet $(RPMBUILD_FLAGS) --define '_topdir $(TOP)/rpm' \
	        $(BUILD)/rpm/SPECS/$$spec.spec || exit 1; \
	done
	cp $(BUILD)/rpm/RPMS/noarch/qubes-wyng-dom0-$(VERSION)-1*.noarch.rpm \
	   $(BUILD)/rpm/RPMS/noarch/qubes-wyng-vm-$(VERSION)-1*.noarch.rpm $(BUILD)/

deb: $(TARBALL)
	rm -rf $(BUILD)/deb
	mkdir -p $(BUILD)/deb
	tar -xzf $(TARBALL) -C $(BUILD)/deb
	cp -r packaging/debian $(BUILD)/deb/$(NAME)-$(VERSION)/debian
	sed -e 's/@VERSION@/$(VERSION)/g' -e 's/@DATE@/$(DEB_DATE)/g' \
	    packaging/debian/changelog.in > $(BUILD)/deb/$(NAME)-$(VERSION)/debian/changelog
	rm $(BUILD)/deb/$(NAME)-$(VERSION)/debian/changelog.in
	cd $(BUILD)/deb/$(NAME)-$(VERSION) && env PATH=$(DEB_PATH) dpkg-buildpackage --build=binary --no-sign
	cp $(BUILD)/deb/qubes-wyng-vm_$(VERSION)-1_all.deb $(BUILD)/

man:
	$(PYTHON) doc/make_man.py

test:
	$(PYTEST) tests -q

test-quick:
	$(PYTEST) tests -q -m 'not slow'

clean:
	rm -rf $(BUILD)

# Files outside the Python packages; the spec files and debian/rules call these.
install-dom0:
	install -D -m 0644 etc/wyng/wyng.ini $(DESTDIR)$(SYSCONFDIR)/wyng/wyng.ini
	install -D -m 0644 etc/wyng/schedule.conf $(DESTDIR)$(SYSCONFDIR)/wyng/schedule.conf
	install -D -m 0644 packaging/systemd/qubes-wyng-backup.service $(DESTDIR)$(UNITDIR)/qubes-wyng-backup.service
	install -D -m 0644 packaging/systemd/qubes-wyng-backup.timer $(DESTDIR)$(UNITDIR)/qubes-wyng-backup.timer
	install -D -m 0755 packaging/systemd/qubes-wyng-notify $(DESTDIR)$(LIBDIR)/qubes-wyng/notify
	install -D -m 0644 qubes-rpc/policy/90-qubes-wyng.policy \
	    $(DESTDIR)$(SYSCONFDIR)/qubes/policy.d/90-qubes-wyng.policy
	install -D -m 0644 doc/qvm-wyng.1 $(DESTDIR)$(MANDIR)/man1/qvm-wyng.1
	install -d -m 0700 $(DESTDIR)$(STATEDIR)/qubes-wyng

install-vm:
	install -d $(DESTDIR)$(SYSCONFDIR)/qubes-rpc
	for service in wyng.Agent wyng.Browse; do \
	    sed -e '1s|^#!.*|#!$(SHEBANG)|' qubes-rpc/$$service > $(DESTDIR)$(SYSCONFDIR)/qubes-rpc/$$service && \
	    chmod 0755 $(DESTDIR)$(SYSCONFDIR)/qubes-rpc/$$service || exit 1; \
	done

FORCE:
