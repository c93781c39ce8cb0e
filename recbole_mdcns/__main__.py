from recbole_mdcns.quick_start import main

if __name__ == "__main__":
    main()
