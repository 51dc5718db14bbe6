@echo off
rem Start Easel: double-click this file, or run: launch.bat [arguments for app.py]
rem
rem Needs only a 64-bit Python 3.10+ (https://www.python.org/downloads/). The first run creates
rem venv\ and installs Easel into it (several minutes); later runs reuse it. All install logic is
rem in scripts\install.py, shared with launch.sh. Messages are printed outside ( ) blocks on
rem purpose: a ")" in a folder name such as "Program Files (x86)" would end the block early.
setlocal
cd /d "%~dp0"

rem pyvenv.cfg marks an existing venv: one whose Python stopped working is reported, not rebuilt.
if exist "venv\pyvenv.cfg" goto venv_ready

rem "py -3" is the launcher that python.org's installer adds. "python" may be the Microsoft
rem Store stub, which installs nothing and fails, so each candidate is tried by running it.
set "EASEL_PYTHON="
set "EASEL_OLD_PYTHON="
for %%P in ("py -3" "python" "python3") do (
    if not defined EASEL_PYTHON (
        %%~P -c "import sys; sys.exit(0 if sys.version_info >= (3, 10) and sys.maxsize > 2**32 else 1)" >nul 2>&1 && set "EASEL_PYTHON=%%~P"
        %%~P -c "import sys" >nul 2>&1 && set "EASEL_OLD_PYTHON=%%~P"
    )
)
if defined EASEL_PYTHON goto create_venv
if defined EASEL_OLD_PYTHON goto python_too_old
echo.
echo Easel cannot start: it needs Python 3.10 or newer, and no Python was found.
echo Install it from https://www.python.org/downloads/ - tick "Add python.exe to PATH" -
echo then double-click launch.bat again.
goto failed

:python_too_old
echo.
echo Easel cannot start: it needs a 64-bit Python 3.10 or newer, but the Python found here is:
%EASEL_OLD_PYTHON% -c "import sys, struct; print(sys.version.split()[0], str(struct.calcsize('P') * 8) + '-bit')"
echo Install a newer one from https://www.python.org/downloads/ then double-click launch.bat again.
goto failed

:create_venv
echo First run: creating a Python environment in "%CD%\venv" ...
%EASEL_PYTHON% -m venv venv
if not errorlevel 1 goto venv_ready
if exist venv rmdir /s /q venv
echo.
echo Easel cannot start: Python could not create its environment, see the messages above.
goto failed

:venv_ready
"venv\Scripts\python.exe" -c "" >nul 2>&1
if not errorlevel 1 goto install
echo.
echo Easel cannot start: the Python environment in "%CD%\venv" no longer works.
echo Was Python updated or removed? Delete the venv folder and double-click launch.bat again.
goto failed

:install
"venv\Scripts\python.exe" scripts\install.py
if not errorlevel 1 goto run
echo.
echo Easel cannot start: the installation did not finish, see the messages above.
goto failed

:run
"venv\Scripts\python.exe" app.py %*
if errorlevel 1 goto failed
exit /b 0

:failed
rem Keep the window open when launch.bat was double-clicked, so the message can be read.
echo.
pause
exit /b 1
